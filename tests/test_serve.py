"""``hf-geocomp serve`` over real HTTP: a tiny base Llama and its pruned, KV-coded copy behind uvicorn on 127.0.0.1.

Requests go through httpx and the ``openai`` client; the page runs in Debian's Chromium driven by Playwright
(skipped, with the reason, where no browser is installed; ``.ci/run`` installs it).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'hf-geocomp[serve]')")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from hf_geocomp.serve.config import ServeConfig  # noqa: E402

from .conftest import _tiny_tokenizer, random_batch, tiny_llama  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
CHROMIUM = "/usr/bin/chromium"
LIMITS = dict(max_prompt_tokens=64, max_new_tokens=24, max_body_bytes=4096)
PROMPTS = ["To be, or not to be", "The quick brown fox", "import os\nprint(", "Once upon a time",
           "def main():", "A rose by any other name", "Lists are mutable", "Friends, Romans, countrymen"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama (GQA) and its copy with 30% of the MLP pruned and the KV cache coded to half, both saved."""
    import hf_geocomp  # noqa: F401
    from hf_geocomp import kv
    from hf_geocomp.geometry import collect_stats
    from hf_geocomp.hub import mark_compressed
    from hf_geocomp.prune import prune, prune_taps

    root = tmp_path_factory.mktemp("serve")
    tok = _tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tiny_llama().save_pretrained(root / "base")
    model, batches = tiny_llama(), [random_batch(2, 16, seed=i) for i in range(3)]
    _, prune_plan = prune(model, collect_stats(model, batches, prune_taps(model, ("mlp",))), sparsity=0.3,
                          targets=("mlp",), allocation="global", compensation="bias+refit")
    _, kv_plan = kv.compress(model, batches, budget=0.5, method="aware", group_size=8, sink_tokens=2,
                             reference_tokens=16)
    mark_compressed(model, prune_plan, kv_plan)
    model.save_pretrained(root / "compressed")
    for name in ("base", "compressed"):
        tok.save_pretrained(root / name)
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    data = ModelCardData(base_model="tiny/llama", model_name="tiny-geocomp", eval_results=[EvalResult(
        task_type="text-generation", dataset_type="text", dataset_name="pydoc", metric_type="perplexity",
        metric_name="perplexity", metric_value=123.4)])
    ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n# tiny\n").save(root / "compressed" / "README.md")
    return str(root / "base"), str(root / "compressed")


def running(folders, **limits):
    """The service of ``folders`` under uvicorn in a thread, on a free port of 127.0.0.1: (base URL, app)."""
    from hf_geocomp.serve.cli import in_thread

    return in_thread(ServeConfig(base=folders[0], compressed=folders[1], **{**LIMITS, **limits}))


@pytest.fixture(scope="module")
def service(folders):
    with running(folders, max_concurrent=8) as (url, app):
        yield url, app


@pytest.fixture
def client(service):
    with httpx.Client(base_url=service[0], timeout=60) as c:
        yield c


def generate(client, prompt, **kw):
    r = client.post("/generate", json={"prompt": prompt, "max_new_tokens": 12, **kw})
    assert r.status_code == 200, r.text
    return r.json()


HALF_FIELDS = {"model", "text", "finish_reason", "prompt_tokens", "generated_tokens", "latency_s",
               "time_to_first_token_s", "tokens_per_s", "kv_cache_bytes", "kv_cache_bytes_used", "seed"}


def check_half(half, name, new_tokens=None):
    assert set(half) == HALF_FIELDS and half["model"] == name, half
    assert half["prompt_tokens"] > 0 and 0 < half["generated_tokens"] <= (new_tokens or 10 ** 9)
    assert half["latency_s"] > 0 and half["tokens_per_s"] > 0 and 0 < half["kv_cache_bytes_used"] <= half["kv_cache_bytes"]
    assert half["finish_reason"] in ("stop", "length")


# ---- what is served ---------------------------------------------------------------------------------------

def test_health_models_and_page(client, folders):
    assert client.get("/health").json() == {"status": "ok", "models": ["base", "compressed"], "in_flight": 0,
                                            "max_concurrent": 8}
    info = client.get("/models").json()
    base, comp = info["models"]
    assert info["limits"] == {**LIMITS, "max_concurrent": 8}
    assert (base["name"], base["source"], comp["name"], comp["source"]) == ("base", folders[0], "compressed", folders[1])
    assert base["compression"] is None and comp["attn_implementation"] == "geocomp_reduced"
    assert base["card"] is None and comp["card"] == {"base_model": "tiny/llama", "results": [
        {"metric": "perplexity", "value": 123.4, "dataset": "pydoc"}]}
    assert comp["parameters"] < base["parameters"] == sum(p.numel() for p in tiny_llama().parameters())
    assert 0.25 < comp["compression"]["prune"]["achieved_sparsity"] < 0.35
    kv = comp["compression"]["kv"]
    assert kv["budget"] == 0.5 and comp["kv_bytes_per_token"] == kv["bytes_per_token"] < kv["full_bytes_per_token"]
    assert base["kv_bytes_per_token"] == kv["full_bytes_per_token"] == 2 * 2 * 2 * 8 * 4  # K+V, layers, kv heads, d, fp32
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<svg" in page.text and "http://" not in page.text.replace('"http://www.w3.org/2000/svg"', "")
    assert "https://" not in page.text and "<link" not in page.text and " src=" not in page.text


def test_generate_both_models_through_their_caches(client, folders):
    """Greedy answers equal the models' own ``generate`` (the compressed one through its coded cache), and the cache
    bytes reported are the bytes of the tokens held."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = generate(client, PROMPTS[0], temperature=0, ignore_eos=True)
    tok = AutoTokenizer.from_pretrained(folders[0])
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    for name, folder in zip(("base", "compressed"), folders):
        half = out["results"][name]
        check_half(half, name, 12)
        model = AutoModelForCausalLM.from_pretrained(folder)
        ref = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
        assert half["text"] == tok.decode(ref.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        assert half["generated_tokens"] == 12 and half["finish_reason"] == "length"
        held = ids.shape[1] + 12 - 1  # the last token is never fed back
        plan = getattr(model, "geocomp_kv_plan", None)
        expected = plan.cache_bytes(held) if plan is not None else held * 256
        assert half["kv_cache_bytes_used"] == expected, name
    assert out["results"]["compressed"]["kv_cache_bytes_used"] < out["results"]["base"]["kv_cache_bytes_used"]


def test_stream_equals_answer_and_sampling_is_seeded(client):
    body = {"prompt": PROMPTS[1], "max_new_tokens": 12, "temperature": 0.9, "seed": 7}
    answer = generate(client, **body)
    texts = {k: v["text"] for k, v in answer["results"].items()}
    again = generate(client, **body)
    assert answer["seed"] == again["seed"] == 7 and {k: v["text"] for k, v in again["results"].items()} == texts
    other = generate(client, **{**body, "seed": 8})
    assert {k: v["text"] for k, v in other["results"].items()} != texts
    events, pieces = [], {"base": "", "compressed": ""}
    with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for block in r.read().decode().strip().split("\n\n"):
            event, data = (line.split(": ", 1)[1] for line in block.split("\n"))
            events.append(event)
            data = json.loads(data)
            if event == "text":
                pieces[data["model"]] += data["text"]
            if event == "result":
                assert data["text"] == texts[data["model"]]
                check_half(data, data["model"])
    assert events[0] == "start" and events[-1] == "done" and events.count("result") == 2
    assert pieces == texts


def test_stop_strings_cut_answers_and_streams(client):
    full = generate(client, PROMPTS[2], max_new_tokens=16, ignore_eos=True)["results"]["base"]["text"]
    stop = full.strip()[3:5]
    assert stop and stop in full
    cut = client.post("/generate", json={"prompt": PROMPTS[2], "max_new_tokens": 16, "stop": [stop],
                                         "models": ["base"], "stream": True})
    streamed = "".join(json.loads(b.split("data: ", 1)[1])["text"] for b in cut.text.split("\n\n")
                       if b.startswith("event: text"))
    answer = generate(client, PROMPTS[2], max_new_tokens=16, stop=[stop], models=["base"])["results"]["base"]
    assert answer["text"] == streamed == full[:full.index(stop)] and answer["finish_reason"] == "stop"


def test_score_is_each_models_perplexity(client, folders):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_geocomp.eval.perplexity import perplexity

    text = "The quick brown fox jumps over the lazy dog, and the dog sleeps on."
    out = client.post("/score", json={"text": text, "prefill": 6}).json()["results"]
    ids = AutoTokenizer.from_pretrained(folders[0])(text, return_tensors="pt")
    for name, folder in zip(("base", "compressed"), folders):
        r = out[name]
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert math.isclose(r["perplexity"], perplexity(model, [{**ids, "use_cache": False}]), rel_tol=1e-5)
        assert r["tokens"] == ids["input_ids"].shape[1] and r["prefill"] == 6
        assert r["continuation_tokens"] == r["tokens"] - 7 and r["continuation_perplexity"] > 1
    assert out["compressed"]["kv_cache_bytes"] < out["base"]["kv_cache_bytes"]


def test_openai_client(service, folders):
    from transformers import AutoTokenizer

    openai = pytest.importorskip("openai")
    tok = AutoTokenizer.from_pretrained(folders[0])
    client = openai.OpenAI(base_url=service[0] + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["base", "compressed"]
    with httpx.Client(base_url=service[0], timeout=60) as h:
        native = generate(h, PROMPTS[3], temperature=0)["results"]
    for name in ("base", "compressed"):
        c = client.completions.create(model=name, prompt=PROMPTS[3], max_tokens=12, temperature=0)
        assert c.choices[0].text == native[name]["text"] and c.usage.completion_tokens == native[name]["generated_tokens"]
        assert c.model == name and c.model_extra["geocomp"]["kv_cache_bytes"] > 0
        chunks = list(client.completions.create(model=name, prompt=PROMPTS[3], max_tokens=12, temperature=0, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == c.choices[0].text
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
        chat = client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0)
        templated = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert templated == "<system>Be brief.\n<user>Hello\n<assistant>"
        assert chat.choices[0].message.role == "assistant"
        assert chat.usage.prompt_tokens == len(tok(templated, add_special_tokens=False)["input_ids"])
        stream = list(client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == chat.choices[0].message.content
        assert stream[-1].usage.completion_tokens == chat.usage.completion_tokens
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' is not served here; models: base, compressed"):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="n is not supported by this server"):
        client.completions.create(model="base", prompt="hi", n=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens 999 is above this server's limit of 24"):
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=999)


# ---- bad requests -----------------------------------------------------------------------------------------

BAD = [
    ("/generate", {"prompt": ""}, 400, "prompt must not be empty."),
    ("/generate", {"prompt": "hi", "max_new_tokens": 100000}, 400,
     "max_new_tokens 100000 is above this server's limit of 24 (hf-geocomp serve --max-new-tokens)."),
    ("/generate", {"prompt": "hi", "max_new_tokens": 0}, 400, "max_new_tokens must be at least 1, got 0."),
    ("/generate", {"prompt": "hi", "max_new_tokens": "ten"}, 400, "max_new_tokens: input should be a valid integer"),
    ("/generate", {"prompt": 42}, 400, "prompt: input should be a valid string, got 42."),
    ("/generate", {"prompt": "hi", "temperature": -1}, 400, "temperature must be in [0, 100]"),
    ("/generate", {"prompt": "hi", "models": ["gpt-4"]}, 404, "model 'gpt-4' is not served here; models: base, compressed."),
    ("/generate", {"prompt": "hi", "colour": "red"}, 400, "colour is not a field of this request."),
    ("/generate", {"max_new_tokens": 3}, 400, "the request needs prompt."),
    ("/generate", ["hi"], 400, "the request body must be a JSON object."),
    ("/generate", {"prompt": "word " * 200}, 400, "above this server's limit of 64 (hf-geocomp serve --max-prompt-tokens)"),
    ("/generate", {"prompt": "x" * 5000}, 413, "the request body is larger than this server's limit of 4096 bytes"),
    ("/score", {"text": "hi"}, 400, "text must hold at least 3 tokens to be scored"),
    ("/score", {"text": "one two three four five six", "prefill": 99}, 400, "prefill must be in [1, "),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model 'nope' is not served here"),
    ("/v1/completions", {"model": "base", "prompt": "hi", "logprobs": 2}, 400, "logprobs is not supported"),
    ("/v1/chat/completions", {"model": "base", "messages": []}, 400, "messages must hold at least one message."),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("/nowhere", {}, 404, "there is no /nowhere here"),
]


@pytest.mark.parametrize("path, body, status, message", BAD, ids=[f"{b[0]}:{b[3][:30]}" for b in BAD])
def test_bad_requests_get_4xx_and_one_sentence(client, path, body, status, message):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["message"].count(". ") == 0 and error["code"] == status


def test_oversized_and_broken_bodies(client):
    def chunks():  # no Content-Length: the server counts while reading
        for _ in range(10):
            yield b'{"prompt": "' + b"x" * 1000
    r = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
    r = client.post("/generate", content=b'{"prompt": "hi"', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "the request body is not valid JSON."


# ---- load, failures, concurrency ----------------------------------------------------------------------------

def test_bounded_concurrent_load(service):
    """50 requests of every kind, 4 at a time: no failure, every answer well-formed."""
    def one(i):
        with httpx.Client(base_url=service[0], timeout=60) as c:
            kind = i % 3
            if kind == 0:
                r = c.post("/generate", json={"prompt": PROMPTS[i % 8], "max_new_tokens": 8, "temperature": 0.7, "seed": i})
                assert r.status_code == 200, r.text
                for name in ("base", "compressed"):
                    check_half(r.json()["results"][name], name, 8)
            elif kind == 1:
                r = c.post("/v1/completions", json={"model": ("base", "compressed")[i % 2], "prompt": PROMPTS[i % 8],
                                                    "max_tokens": 8})
                assert r.status_code == 200, r.text
                assert r.json()["object"] == "text_completion" and r.json()["usage"]["completion_tokens"] <= 8
            else:
                r = c.post("/score", json={"text": PROMPTS[i % 8] + " and so on, and so forth"})
                assert r.status_code == 200, r.text
                assert all(math.isfinite(h["perplexity"]) for h in r.json()["results"].values())
            return r.status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, range(50))) == [200] * 50


def test_one_model_raising_leaves_the_other(client, service):
    model = service[1].state.server.models["compressed"].model

    def boom(module, args, kwargs):
        raise RuntimeError("injected failure")
    # on the embeddings, which every path runs (scoring calls the decoder and the head apart, a chunk at a time)
    hook = model.get_input_embeddings().register_forward_pre_hook(boom, with_kwargs=True)
    try:
        out = generate(client, PROMPTS[4])["results"]
        assert out["compressed"] == {"model": "compressed", "error": "RuntimeError: injected failure"}
        check_half(out["base"], "base")
        r = client.post("/v1/completions", json={"model": "compressed", "prompt": "hi", "max_tokens": 4})
        assert r.status_code == 500 and "model 'compressed' failed: RuntimeError: injected failure" in r.text
        assert client.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 4}).status_code == 200
        streamed = client.post("/generate", json={"prompt": "hi", "max_new_tokens": 4, "stream": True}).text
        assert "event: error\ndata: {\"model\": \"compressed\", \"error\": \"RuntimeError: injected failure\"}" in streamed
        assert streamed.count("event: result") == 1 and streamed.endswith("event: done\ndata: {}\n\n")
        score = client.post("/score", json={"text": "one two three four five"}).json()["results"]
        assert "error" in score["compressed"] and score["base"]["perplexity"] > 0
    finally:
        hook.remove()
    assert client.get("/health").json()["status"] == "ok"
    check_half(generate(client, PROMPTS[4])["results"]["compressed"], "compressed")


def test_concurrent_generations_equal_sequential_ones(service):
    """Requests at once on both models (the coded cache included) give the tokens they give one by one.

    hf_geocomp's reduced attention hands the coded cache's state over through a process-global dict, so the
    server runs one generation at a time on such a model (``engine.SERIAL_ATTENTION``); the base model's
    generations do overlap. With that lock removed this test is what shows whether the attention is thread-safe.
    """
    bodies = [{"prompt": p, "max_new_tokens": 16, "temperature": 0.8 * (i % 2), "seed": i, "ignore_eos": True}
              for i, p in enumerate(PROMPTS)]

    def texts(body):
        with httpx.Client(base_url=service[0], timeout=60) as c:
            return {k: (v["text"], v["kv_cache_bytes_used"]) for k, v in generate(c, **body)["results"].items()}
    sequential = [texts(b) for b in bodies]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        assert list(pool.map(texts, bodies)) == sequential


def test_limits_on_concurrent_requests_and_the_event_loop(folders):
    """Beyond max_concurrent a request gets 429 while a stream is open; /health answers during a generation."""
    with running(folders, max_concurrent=1) as (url, app):
        model = app.state.server.models["base"].model
        body = {"prompt": "hi", "max_new_tokens": 24, "ignore_eos": True, "models": ["base"], "stream": True}
        with httpx.Client(base_url=url, timeout=60) as c:
            c.post("/generate", json=body)  # warm-up: the first stream imports what streams need
        hook = model.register_forward_pre_hook(lambda *a: time.sleep(0.1))  # a slow generation: 25 forwards ≥ 2.4 s
        try:
            with httpx.Client(base_url=url, timeout=60) as c:
                with c.stream("POST", "/generate", json=body) as r:
                    lines = r.iter_lines()  # kept: dropping it would close the stream
                    assert next(lines) == "event: start"
                    t = time.perf_counter()
                    health = c.get("/health").json()
                    assert time.perf_counter() - t < 0.5 and health["in_flight"] == 1
                    refused = c.post("/v1/completions", json={"model": "compressed", "prompt": "hi"})
                    assert refused.status_code == 429 and refused.json()["error"]["message"] == (
                        "this server answers at most 1 requests at once (hf-geocomp serve --max-concurrent); retry "
                        "when one has finished.")
                    assert "event: done" in list(lines)
                assert c.post("/v1/completions", json={"model": "compressed", "prompt": "hi"}).status_code == 200
        finally:
            hook.remove()


def test_cli_refuses_a_busy_port_before_loading(capsys):
    import socket

    from hf_geocomp.cli import main

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        t = time.perf_counter()
        assert main(["serve", "--base", "nowhere/base", "--compressed", "nowhere/c", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1
    assert time.perf_counter() - t < 5


def test_cli_refuses_a_bad_second_model_before_loading_the_first(folders, capsys, monkeypatch):
    import socket

    from hf_geocomp.cli import main
    from hf_geocomp.serve import engine

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before both were checked")

    monkeypatch.setattr(engine.ServedModel, "__init__", no_loading)
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert main(["serve", "--base", folders[0], "--compressed", "/nowhere/folder", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "'/nowhere/folder' is neither a bundled name" in err and len(err.strip().splitlines()) == 1


# ---- the page in a real browser -----------------------------------------------------------------------------

def test_page_in_headless_chromium(service):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (Debian: apt-get install -y chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(service[0] + "/")
            page.wait_for_selector("#out-compressed")
            assert "parameters" in page.inner_text("#half-compressed") and "KV cache coded" in page.inner_text(
                "#half-compressed")
            page.fill("#prompt", "Friends, Romans")
            page.fill("#max-new-tokens", "10")
            page.click("#generate")
            for name in ("base", "compressed"):
                page.wait_for_selector(f"#stats-{name}[data-done='1']", timeout=30000)
                out = page.inner_text(f"#out-{name}")
                assert out.startswith("Friends, Romans") and len(out) > len("Friends, Romans")
                assert "KV cache bytes" in page.inner_text(f"#stats-{name}")
            assert page.locator("#chart rect").count() == 8  # four measures × two models
        finally:
            browser.close()


def test_bench_serve_measures_one_model_under_load(service, folders):
    """The clients of `hf-geocomp bench-serve` against the running service (the command adds only the child server)."""
    from hf_geocomp.studies.serve_bench import measure, prompt_texts

    prompts = prompt_texts(folders[0], "pydoc:evaluation", 12, 20)
    assert len(prompts) == 20 and len(set(prompts)) == 20
    row = measure(service[0], "compressed", prompts, clients=2, duration=1.0, new_tokens=6)
    assert row["method"] == "compressed" and row["clients"] == 2 and row["errors"] == 0 and row["requests"] >= 2
    assert row["new_tokens"] == 6 and row["latency_p95_s"] >= row["latency_p50_s"] > 0 and row["requests_per_s"] > 0
    info = {m["name"]: m for m in httpx.get(service[0] + "/models").json()["models"]}
    tokens = row["prompt_tokens"] + row["new_tokens"] - 1  # every request holds prompt + new - 1 tokens
    assert row["kv_bytes_used"] < tokens * info["base"]["kv_bytes_per_token"]
