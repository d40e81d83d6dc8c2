"""From the Hub and back on a real model: compress on load → save → reload in a fresh process.

``python -m hf_geocomp.studies.hub_roundtrip`` (under the bench lock) writes
``recipes/results/hub_smollm2_roundtrip.json`` and the example card ``model_cards/examples/<name>/``.

The bundled SmolLM2 is a GGUF file, and transformers refuses a quantization_config together with
``gguf_file``; so the base model is written once as a safetensors folder (dequantized float32,
checked against the GGUF load) and compress-on-load reads that folder.

In the fresh process (``--source``: the saved folder, or a repo id served at ``HF_ENDPOINT``):
load time of base and compressed alternated (A B A B ...; ratio of medians), max |Δlogits| against
the in-memory compressed model, greedy tokens, parameters, KV cache bytes under ``generate()``,
teacher-forced perplexity and continuation perplexity (prefill through the cache, score after it)
on held-out text, each against the base model in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

REQUEST = dict(prune=dict(sparsity=0.2, criterion="variance", targets=["mlp"], allocation="global",
                          compensation="bias+refit"),
               kv=dict(budget=0.25, method="fisher"))


def base_folder(name: str, folder: Path) -> tuple[Path, float | None]:
    """A safetensors copy of a bundled (GGUF) model, written once; and max |Δlogits| to the GGUF load."""
    from transformers import AutoModelForCausalLM

    from ..data import load_model
    from ..io import output_dir

    if (folder / "config.json").is_file():
        return folder, None
    model, tok = load_model(name)
    with output_dir(str(folder)) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    ids = torch.arange(100, 164)[None]
    again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return folder, float((again(input_ids=ids).logits - model(input_ids=ids).logits).abs().max())


def _eval_data(tok, model, args):
    from ..data import load_corpus, token_blocks

    corpus = load_corpus(args.eval_data)
    blocks = token_blocks(tok, corpus, args.eval_block, max_tokens=args.eval_tokens, model=model)[:]["input_ids"]
    windows = token_blocks(tok, corpus, args.prefill + args.score, max_tokens=args.windows * (args.prefill + args.score),
                           seed=1, model=model)[:]["input_ids"]  # (n, prefill + score)
    return blocks, windows


def _median(xs):
    return sorted(xs)[len(xs) // 2]


@torch.no_grad()
def child(args) -> None:
    """The fresh process: load, compare, measure; JSON to ``args.child_out``."""
    import hf_geocomp  # noqa: F401  (the plugin: without it this checkpoint refuses to load)
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from ..eval.perplexity import continuation_nll
    from ..eval.memory import tensor_bytes
    from ..eval.perplexity import perplexity

    torch.set_num_threads(args.threads)
    times, models = {"base": [], "compressed": []}, {}
    for _ in range(args.load_repeats):  # A B A B ...: the ratio is measured in one run
        for key, src in (("base", args.base), ("compressed", args.source)):
            t = time.perf_counter()
            m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
            times[key].append(time.perf_counter() - t)
            models[key] = m.eval()
    base, model = models["base"], models["compressed"]
    tok = AutoTokenizer.from_pretrained(args.base)
    ref = torch.load(args.reference)
    logits = model(input_ids=ref["ids"]).logits
    prompt = ref["prompt"]
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
              pad_token_id=tok.eos_token_id, return_dict_in_generate=True)
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kw)
    out_base = base.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kw)
    plan = model.geocomp_kv_plan
    tokens = out.sequences.shape[1] - 1  # the last token is never written to the cache
    blocks, windows = _eval_data(tok, base, args)
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in blocks.split(args.batch_size)]
    cont = {}
    for key, m, make in (("base", base, lambda: DynamicCache(config=base.config)),
                         ("compressed", model, lambda: plan.cache(model))):
        nll = [continuation_nll(m, w[None], args.prefill, make)[0] for w in windows]
        cont[key] = math.exp(sum(nll) / len(nll))
    result = {
        "source": args.source, "cache_class": type(out.past_key_values).__name__,
        "max_abs_dlogits": float((logits - ref["logits"]).abs().max()),
        "identical_logits": bool(torch.equal(logits, ref["logits"])),
        "greedy_identical": bool(torch.equal(out.sequences, ref["greedy"])),
        "greedy_agreement_vs_base": float((out.sequences[:, prompt.shape[1]:] ==
                                           out_base.sequences[:, prompt.shape[1]:]).float().mean()),
        "params": model.num_parameters(), "base_params": base.num_parameters(),
        "kv_bytes": tensor_bytes(out.past_key_values), "base_kv_bytes": tensor_bytes(out_base.past_key_values),
        "plan_kv_bytes": plan.cache_bytes(tokens), "cache_tokens": tokens,
        "ppl": perplexity(model, batches), "base_ppl": perplexity(base, batches),
        "continuation_ppl": cont["compressed"], "base_continuation_ppl": cont["base"],
        "load_s": times, "load_time_ratio": _median(times["compressed"]) / _median(times["base"]),
    }
    Path(args.child_out).write_text(json.dumps(result, indent=1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m hf_geocomp.studies.hub_roundtrip", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="bundled model (GGUF) or model folder")
    p.add_argument("--base-dir", default="runs/hub/smollm2-135m-base", help="safetensors copy of the base (written once)")
    p.add_argument("--work", default="runs/hub/smollm2-135m-geocomp", help="the saved compressed model")
    p.add_argument("--calibration", default="shakespeare:calibration")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    p.add_argument("--eval-data", default="shakespeare:evaluation")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-block", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--windows", type=int, default=4, help="continuation windows")
    p.add_argument("--prefill", type=int, default=1024)
    p.add_argument("--score", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens after a prefill-token prompt")
    p.add_argument("--load-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--push-repo-id", default=None, help="also push the export to this repo id at HF_ENDPOINT and "
                                                        "reload it from there")
    p.add_argument("--base-model-id", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="for the card metadata")
    p.add_argument("--card-dir", default="model_cards/examples/smollm2-135m-geocomp")
    p.add_argument("--output", "-o", default="recipes/results/hub_smollm2_roundtrip.json")
    p.add_argument("--card-only", action="store_true", help="only re-render the example card from --work and --output")
    p.add_argument("--load-times", default=None, metavar="JSON",
                   help="only time loads of the saved base and compressed folders, and of --push-repo-id from the "
                        "populated cache under HF_HOME with HF_HUB_OFFLINE=1, alternated; results to this JSON")
    p.add_argument("--recipe", default=None, help="the script that ran this (recorded in the results)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--reference", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.card_only:  # re-render the example card of the committed results from the saved model
        from transformers import AutoModelForCausalLM

        result = json.loads(Path(args.output).read_text())
        return example_card(AutoModelForCausalLM.from_pretrained(args.work), result, args)
    if args.load_times:
        return load_times(args, "python -m hf_geocomp.studies.hub_roundtrip " +
                          shlex.join(sys.argv[1:] if argv is None else argv))
    run(args, "python -m hf_geocomp.studies.hub_roundtrip " + shlex.join(sys.argv[1:] if argv is None else argv))


@torch.no_grad()
def run(args, command: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..errors import GeoCompError
    from ..hub import GeoCompConfig, export, push
    from ..hub.card import versions
    from ..io import write_json

    for path in (args.work, args.card_dir):
        if Path(path).exists() and any(Path(path).iterdir()):
            raise GeoCompError(f"output folder {path!r} already exists and is not empty; remove it first.")
    torch.set_num_threads(args.threads)
    base_dir, gguf_diff = base_folder(args.model, Path(args.base_dir))
    request = GeoCompConfig(**REQUEST, calibration=args.calibration, tokens=args.tokens)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, quantization_config=request)
    compress_s = time.perf_counter() - t
    tok = AutoTokenizer.from_pretrained(base_dir)
    blocks, windows = _eval_data(tok, model, args)
    ids = blocks[:2]
    prompt = windows[:1, : args.prefill]
    greedy = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    export(model, args.work, tokenizer=tok, base_model=args.base_model_id, repo_id=args.push_repo_id, command=command)
    reference = Path(args.work).parent / (Path(args.work).name + ".reference.pt")
    torch.save({"ids": ids, "logits": model(input_ids=ids).logits, "prompt": prompt, "greedy": greedy}, reference)
    source = args.work
    if args.push_repo_id:
        push(args.work, args.push_repo_id)
        source = args.push_repo_id
    child_out = Path(args.work).parent / (Path(args.work).name + ".child.json")
    cmd = [sys.executable, "-m", "hf_geocomp.studies.hub_roundtrip", "--child", "--source", source, "--base",
           str(base_dir), "--reference", str(reference), "--child-out", str(child_out),
           *(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("eval_data", "eval_tokens", "eval_block",
                                                                      "batch_size", "windows", "prefill", "score",
                                                                      "new_tokens", "load_repeats", "threads"))]
    subprocess.run(cmd, check=True)
    c = json.loads(child_out.read_text())
    plan = model.config.quantization_config.plan
    row = {"method": "geocomp prune 20% global bias+refit + KV 0.25 fisher", "sparsity": plan["prune"]["achieved_sparsity"],
           "params": c["params"], "params_ratio": c["params"] / c["base_params"],
           "kv_bytes": c["kv_bytes"], "kv_bytes_ratio": c["kv_bytes"] / c["base_kv_bytes"],
           "plan_kv_bytes": c["plan_kv_bytes"], "ppl": c["ppl"], "ppl_ratio": c["ppl"] / c["base_ppl"],
           "continuation_ppl": c["continuation_ppl"],
           "continuation_ppl_ratio": c["continuation_ppl"] / c["base_continuation_ppl"],
           "max_abs_dlogits": c["max_abs_dlogits"], "identical_logits": c["identical_logits"],
           "greedy_identical": c["greedy_identical"], "greedy_agreement_vs_base": c["greedy_agreement_vs_base"],
           "load_time_ratio": c["load_time_ratio"], "load_s": c["load_s"], "compress_on_load_s": compress_s,
           "cache_class": c["cache_class"], "source": c["source"], "eval_data": args.eval_data}
    result = {"command": command, "recipe": args.recipe, "model": args.model, "base_folder_gguf_max_abs_dlogits": gguf_diff,
              "data": {"calibration": f"{args.calibration} ({args.tokens} tokens)",
                       "evaluation": f"{args.eval_data}: {len(blocks)} x {args.eval_block} tokens teacher-forced; "
                                     f"{len(windows)} windows of {args.prefill} prefill + {args.score} scored"},
              "request": request.to_dict(),
              "baseline": {"method": "base model", "params": c["base_params"], "kv_bytes": c["base_kv_bytes"],
                           "ppl": c["base_ppl"], "continuation_ppl": c["base_continuation_ppl"]},
              "rows": [row], "versions": versions(),
              "note": "2 CPU cores shared with other jobs; load times are a ratio of medians of alternated loads."}
    write_json(args.output, result)
    example_card(model, result, args)
    print(json.dumps(row, indent=1))


def example_card(model, result: dict, args) -> None:
    """The example model card of a results file (``--card-only`` re-renders it from the saved model)."""
    from ..hub.card import COLUMNS, plot_plan, render_card
    from ..hub.shapes import stock_shapes

    card_dir = Path(args.card_dir)
    card_dir.mkdir(parents=True, exist_ok=True)
    plan = model.config.quantization_config.plan
    plot = plot_plan(plan, stock_shapes(model), card_dir / "plan.png")
    rows = [{k: r[k] for k in COLUMNS if k in r} for r in result["rows"]]
    command = result["command"] + (f"  # run by {result['recipe']}" if result.get("recipe") else "")
    card = render_card(model, {**result, "rows": rows}, base_model=args.base_model_id,
                       repo_id=args.push_repo_id or "your-namespace/smollm2-135m-geocomp", command=command, plot=plot)
    card.save(str(card_dir / "README.md"))


TIMED = """
import json, sys, time, torch
import hf_geocomp
from transformers import AutoModelForCausalLM
torch.set_num_threads(int(sys.argv[1]))
repeats, sources = int(sys.argv[2]), sys.argv[3:]
times = {s: [] for s in sources}
for _ in range(repeats):
    for s in sources:
        t = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(s, dtype=torch.float32)
        times[s].append(time.perf_counter() - t)
print(json.dumps(times))
"""


def load_times(args, command: str) -> None:
    """Load time of the compressed model from its folder and from the offline HF cache by repo id, as ratios to
    the base folder's (alternated in one fresh process, median of ``--load-repeats``)."""
    import os

    from ..io import write_json

    sources = [args.base_dir, args.work] + ([args.push_repo_id] if args.push_repo_id else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", TIMED, str(args.threads), str(args.load_repeats), *sources],
                         check=True, capture_output=True, text=True, env=env).stdout
    times = json.loads(out.strip().splitlines()[-1])
    base = _median(times[args.base_dir])
    rows = [{"method": "compressed, saved folder", "load_time_ratio": _median(times[args.work]) / base,
             "load_s": times[args.work]}]
    if args.push_repo_id:
        rows.append({"method": f"compressed, repo id {args.push_repo_id} from the HF cache (HF_HUB_OFFLINE=1)",
                     "load_time_ratio": _median(times[args.push_repo_id]) / base, "load_s": times[args.push_repo_id]})
    write_json(args.load_times, {"command": command, "model": args.model, "data": None,
                                 "baseline": {"method": "base folder", "load_s": times[args.base_dir]}, "rows": rows,
                                 "note": f"HF_HOME={os.environ.get('HF_HOME')} (populated by the round trip); one fresh "
                                         "process, loads alternated base / folder / repo id; 2 CPU cores shared with "
                                         "other jobs"})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
