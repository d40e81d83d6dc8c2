"""Benchmark: ``hf-geocomp serve`` under load, the base model against the compressed one.

Starts ``hf-geocomp serve`` in its own process (so the clients do not share its interpreter), then for each model
and each number of concurrent clients sends ``POST /generate`` requests naming that one model for ``duration``
seconds: greedy, ``new_tokens`` tokens each with EOS ignored (every request does the same work), prompts of
``prompt_tokens`` tokens cut from held-out text, a different prompt for each request. Rows: requests/s, client-side
p50/p95 latency, the server's own generation latency, generated tokens/s, and the KV cache bytes each request
held, with their ratios to the base model at the same concurrency. Speeds are ratios within one run, on one
machine; the absolute numbers only describe it.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from ..errors import GeoCompError
from ..options import Options, option


@dataclass(kw_only=True)
class ServeBenchOptions(Options):
    """Requests/s and p50/p95 latency of `hf-geocomp serve`, base against compressed, under 1 and more clients."""

    base: str = option("smollm2-135m", "the base model (bundled name, folder, .gguf file or Hub id)")
    compressed: str = option("runs/smollm2-135m-geocomp", "the compressed model: the folder `hf-geocomp run` wrote")
    clients: list[int] = option([1, 4], "concurrent clients, one measurement of each model per value",
                                range="[1, inf)")
    duration: float = option(60.0, "seconds of requests per (model, clients)", range="(0, inf)")
    warmup: int = option(2, "untimed requests per model before its measurements", range="[0, inf)")
    prompts: str = option("shakespeare:evaluation", "held-out text the prompts are cut from")
    prompt_tokens: int = option(64, "tokens per prompt", range="[1, inf)")
    new_tokens: int = option(32, "tokens generated per request (EOS ignored)", range="[1, inf)")
    dtype: str = option("float32", "dtype the server loads the models in", choices=("float32", "bfloat16", "float16"))
    threads: int | None = option(None, "torch threads of the server (default: torch's own choice)", range="[1, inf)")
    startup_timeout: float = option(900.0, "seconds the server may take to load both models", range="(0, inf)")
    output: str = "recipes/results/serve_smollm2.json"


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def prompt_texts(model: str, source: str, tokens: int, count: int) -> list[str]:
    """``count`` prompts of ``tokens`` tokens of ``model``'s tokenizer, cut one after another from ``source``."""
    from transformers import AutoTokenizer

    from ..data import load_corpus, resolve_model

    where, gguf = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(where, **({"gguf_file": gguf} if gguf else {}))
    out = []
    for _, text in load_corpus(source).documents:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out += [tok.decode(ids[i:i + tokens]) for i in range(0, len(ids) - tokens + 1, tokens)][:count - len(out)]
        if len(out) == count:
            return out
    if not out:
        raise GeoCompError(f"prompts {source!r} hold fewer than {tokens} tokens.")
    return (out * (count // len(out) + 1))[:count]


class Server:
    """``hf-geocomp serve`` in a child process on a free port of 127.0.0.1, stopped on exit."""

    def __init__(self, args: ServeBenchOptions, max_concurrent: int):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "hf_geocomp.cli", "serve", "--base", args.base, "--compressed", args.compressed,
               "--port", str(self.port), "--max-concurrent", str(max_concurrent), "--max-new-tokens",
               str(args.new_tokens), "--max-prompt-tokens", str(4 * args.prompt_tokens + 16), "--dtype", args.dtype]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 — the server's log, closed in __exit__
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        self.timeout = args.startup_timeout

    def __enter__(self):
        import httpx

        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                tail = self.log.read().strip().splitlines()
                raise GeoCompError(f"the server stopped before it answered: {tail[-1] if tail else 'no message'}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.__exit__()
        raise GeoCompError(f"the server did not answer within {self.timeout:.0f} s (--startup-timeout).")

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def measure(url: str, model: str, prompts: list[str], clients: int, duration: float, new_tokens: int) -> dict:
    """``clients`` threads sending requests to ``model`` for ``duration`` seconds: what they saw."""
    import httpx
    import numpy as np

    lock, next_prompt, done = threading.Lock(), [0], []
    start = time.perf_counter()
    deadline = start + duration

    def client():
        with httpx.Client(base_url=url, timeout=600) as c:
            while time.perf_counter() < deadline:
                with lock:
                    prompt = prompts[next_prompt[0] % len(prompts)]
                    next_prompt[0] += 1
                t = time.perf_counter()
                r = c.post("/generate", json={"prompt": prompt, "max_new_tokens": new_tokens, "ignore_eos": True,
                                              "temperature": 0, "models": [model]})
                half = r.json().get("results", {}).get(model, {}) if r.status_code == 200 else {}
                with lock:
                    done.append((time.perf_counter(), time.perf_counter() - t, half if "error" not in half else None))
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ok = [(end, lat, h) for end, lat, h in done if h is not None]
    if not ok:
        raise GeoCompError(f"no request to {model!r} succeeded; see the server's answer with hf-geocomp serve.")
    wall = max(end for end, _, _ in done) - start
    lat = np.array([lat for _, lat, _ in ok])

    def mean(key: str) -> float:
        return float(np.mean([h[key] for _, _, h in ok]))
    return {"method": model, "clients": clients, "requests": len(ok), "errors": len(done) - len(ok),
            "wall_seconds": round(wall, 2), "requests_per_s": len(ok) / wall,
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p95_s": float(np.percentile(lat, 95)),
            "server_latency_p50_s": float(np.median([h["latency_s"] for _, _, h in ok])),
            "tokens_per_s": sum(h["generated_tokens"] for _, _, h in ok) / wall,
            "prompt_tokens": mean("prompt_tokens"), "new_tokens": mean("generated_tokens"),
            "kv_bytes": mean("kv_cache_bytes"), "kv_bytes_used": mean("kv_cache_bytes_used")}


def run_serve_bench(args: ServeBenchOptions) -> None:
    import httpx

    from ..data import resolve_model
    from ..io import resolved_args, write_json

    for name in (args.base, args.compressed):
        resolve_model(name)  # a wrong name stops here, before the server loads anything
    per_run = max(1, int(args.duration * 20)) * max(args.clients)  # more than any run can send
    prompts = prompt_texts(args.base, args.prompts, args.prompt_tokens, min(per_run, 2000))
    rows = []
    with Server(args, max_concurrent=2 * max(args.clients)) as server:
        models = httpx.get(server.url + "/models", timeout=30).json()["models"]
        for model in ("base", "compressed"):
            for i in range(args.warmup):
                httpx.post(server.url + "/generate", timeout=600, json={
                    "prompt": prompts[i % len(prompts)], "max_new_tokens": args.new_tokens, "models": [model]})
            for clients in args.clients:
                row = measure(server.url, model, prompts, clients, args.duration, args.new_tokens)
                rows.append(row)
                print(f"{model} x{clients}: {row['requests_per_s']:.2f} requests/s, p50 {row['latency_p50_s']:.3f} s, "
                      f"p95 {row['latency_p95_s']:.3f} s, {row['kv_bytes']:.0f} KV bytes/request", flush=True)
    base = {r["clients"]: r for r in rows if r["method"] == "base"}
    for r in rows:
        b = base[r["clients"]]
        r.update(kv_bytes_ratio=r["kv_bytes"] / b["kv_bytes"], requests_per_s_ratio=r["requests_per_s"] / b["requests_per_s"],
                 latency_ratio=r["latency_p50_s"] / b["latency_p50_s"], tokens_per_s_ratio=r["tokens_per_s"] / b["tokens_per_s"])
    result = {"command": args.command_line, "model": {"base": args.base, "compressed": args.compressed},
              "data": args.prompts, "baseline": base[min(base)], "models": models, "args": resolved_args(args),
              "rows": rows}
    write_json(args.output, result)
    print(f"wrote {args.output}")
