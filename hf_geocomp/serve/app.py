"""The FastAPI app: the page, /generate, /score, /models, /health, and the OpenAI-compatible /v1 routes.

Every model's work runs in a worker thread (``run_in_threadpool``), never on the event loop; /generate runs
the models at once, each in its own thread. A model that raises answers with its error in its own half of
the answer (or a 500 naming it on /v1), and the other model, the server and later requests go on.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import GeoCompError
from .config import ServeConfig
from .engine import Sampling, ServedModel
from .limits import Gate, Limits, ServeError, error_response
from .schemas import GenerateRequest, ScoreRequest

log = logging.getLogger("hf_geocomp.serve")
LIMITED = ("/generate", "/score", "/v1/completions", "/v1/chat/completions")


class Server:
    """The served models and the limits requests are checked against (shared by every route)."""

    def __init__(self, models: dict[str, ServedModel], config: ServeConfig):
        self.models, self.config, self.gate = models, config, Gate(config.max_concurrent)

    def pick(self, names: list[str] | None) -> list[ServedModel]:
        for name in names or []:
            if name not in self.models:
                raise ServeError(404, f"model {name!r} is not served here; models: {', '.join(self.models)}.", "model")
        if names is not None and not names:
            raise ServeError(400, "models must name at least one model.", "models")
        return [self.models[n] for n in names] if names else list(self.models.values())

    def prompt_ids(self, model: ServedModel, text: str, field: str = "prompt", ids: list[int] | None = None) -> list[int]:
        if not text.strip() and ids is None:
            raise ServeError(400, f"{field} must not be empty.", field)
        ids = model.encode(text) if ids is None else ids
        if not ids:
            raise ServeError(400, f"{field} must not be empty.", field)
        if len(ids) > self.config.max_prompt_tokens:
            raise ServeError(400, f"the {field} holds {len(ids)} tokens for model {model.name!r}, above this server's "
                                  f"limit of {self.config.max_prompt_tokens} (hf-geocomp serve --max-prompt-tokens).",
                             field)
        return ids

    def sampling(self, max_new_tokens: int, temperature: float, top_p: float, seed: int | None, stop: list[str],
                 ignore_eos: bool = False, field: str = "max_new_tokens") -> Sampling:
        limit = self.config.max_new_tokens
        if max_new_tokens < 1:
            raise ServeError(400, f"{field} must be at least 1, got {max_new_tokens}.", field)
        if max_new_tokens > limit:
            raise ServeError(400, f"{field} {max_new_tokens} is above this server's limit of {limit} "
                                  f"(hf-geocomp serve --max-new-tokens).", field)
        if not 0 <= temperature <= 100:
            raise ServeError(400, f"temperature must be in [0, 100] (0 is greedy), got {temperature}.", "temperature")
        if not 0 < top_p <= 1:
            raise ServeError(400, f"top_p must be in (0, 1], got {top_p}.", "top_p")
        if seed is not None and not 0 <= seed < 2 ** 63:
            raise ServeError(400, f"seed must be in [0, 2**63), got {seed}.", "seed")
        if any(not s for s in stop) or len(stop) > 4:
            raise ServeError(400, "stop takes at most 4 non-empty strings.", "stop")
        return Sampling(max_new_tokens, temperature, top_p, secrets.randbelow(2 ** 31) if seed is None else seed,
                        list(stop), ignore_eos)


def failure(model: ServedModel, error: Exception) -> str:
    """One line for a model that failed on a request (the traceback goes to the server's log)."""
    if not isinstance(error, GeoCompError):
        log.error("model %r failed on a request", model.name, exc_info=error)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else 'no message'}"


def half(model: ServedModel, work, *args) -> dict:
    """``work(*args)`` (one of ``model``'s methods) as this model's half of an answer: its result, or its error."""
    try:
        out = work(*args)
        return {"model": model.name, **(out.to_dict() if hasattr(out, "to_dict") else out)}
    except Exception as e:  # noqa: BLE001 — this model's failure is its half of the answer; the other goes on
        return {"model": model.name, "error": failure(model, e)}


async def stream_models(jobs: list[tuple[ServedModel, list[int], Sampling]]):
    """Run each (model, prompt ids, sampling) in its own thread; yield ``("text", name, piece)`` as text is decoded,
    then ``("result", name, Generation)`` or ``("error", name, message)`` once per model. Closing the generator
    (the client went away) stops the generations at their next token."""
    loop, queue, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

    def work(model, ids, sampling):
        def put(item):
            loop.call_soon_threadsafe(queue.put_nowait, item)
        try:
            put(("result", model.name, model.generate(ids, sampling, lambda t: put(("text", model.name, t)), cancel)))
        except Exception as e:  # noqa: BLE001 — reported in this model's stream
            put(("error", model.name, failure(model, e)))

    tasks = [asyncio.ensure_future(run_in_threadpool(work, *job)) for job in jobs]
    left = len(jobs)
    try:
        while left:
            item = await queue.get()
            left -= item[0] != "text"
            yield item
    finally:
        cancel.set()
        del tasks


def sse(event: str | None, data) -> str:
    import json

    return (f"event: {event}\n" if event else "") + f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(models: dict[str, ServedModel], config: ServeConfig) -> FastAPI:
    """The app serving ``models`` (name → model) under ``config``'s limits."""
    from .openai_api import router

    server = Server(models, config)
    app = FastAPI(title="hf-geocomp serve", description="A base and a compressed model side by side.",
                  docs_url="/docs", redoc_url=None)
    app.state.server = server
    app.add_middleware(Limits, max_body_bytes=config.max_body_bytes, gate=server.gate, paths=LIMITED)

    @app.exception_handler(ServeError)
    async def refused(request: Request, exc: ServeError):
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = {404: f"there is no {request.url.path} here; see GET /docs for the endpoints.",
                   405: f"{request.method} is not allowed on {request.url.path}."}.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return error_response(400, *validation_message(exc.errors()))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return (resources.files(__package__) / "page.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(models), "in_flight": server.gate.in_flight,
                "max_concurrent": config.max_concurrent}

    @app.get("/models")
    async def list_models():
        limits = {k: getattr(config, k) for k in ("max_prompt_tokens", "max_new_tokens", "max_concurrent",
                                                  "max_body_bytes")}
        return {"models": [m.summary for m in models.values()], "limits": limits}

    @app.post("/generate")
    async def generate(req: GenerateRequest):
        chosen = server.pick(req.models)
        prompts = [server.prompt_ids(m, req.prompt) for m in chosen]
        new_tokens = min(64, config.max_new_tokens) if req.max_new_tokens is None else req.max_new_tokens
        sampling = server.sampling(new_tokens, req.temperature, req.top_p, req.seed, req.stop, req.ignore_eos)
        jobs = [(m, ids, sampling) for m, ids in zip(chosen, prompts)]
        if not req.stream:
            halves = await asyncio.gather(*(run_in_threadpool(half, m, m.generate, ids, s) for m, ids, s in jobs))
            return {"prompt": req.prompt, "seed": sampling.seed, "results": {h["model"]: h for h in halves}}

        async def events():
            yield sse("start", {"prompt": req.prompt, "seed": sampling.seed, "models": [m.name for m in chosen]})
            async for kind, name, value in stream_models(jobs):
                data = {"model": name, "text": value} if kind == "text" else \
                    {"model": name, "error": value} if kind == "error" else {"model": name, **value.to_dict()}
                yield sse(kind, data)
            yield sse("done", {})
        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/score")
    async def score(req: ScoreRequest):
        jobs = []
        for model in models.values():  # every check before any work
            ids = server.prompt_ids(model, req.text, "text")
            if len(ids) < 3:
                raise ServeError(400, f"text must hold at least 3 tokens to be scored, it holds {len(ids)}.", "text")
            prefill = len(ids) // 2 if req.prefill is None else req.prefill
            if not 1 <= prefill <= len(ids) - 2:
                raise ServeError(400, f"prefill must be in [1, {len(ids) - 2}] for this text of {len(ids)} tokens, "
                                      f"got {prefill}.", "prefill")
            jobs.append((model, ids, prefill))

        halves = await asyncio.gather(*(run_in_threadpool(half, m, m.score, ids, p) for m, ids, p in jobs))
        return {"results": {h["model"]: h for h in halves}}

    app.include_router(router)
    return app


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One sentence (and the field) for pydantic's first complaint about a request body."""
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    field = ".".join(loc) or None
    if err["type"] == "json_invalid":
        return "the request body is not valid JSON.", None
    if not loc:
        return "the request body must be a JSON object.", None
    if err["type"] == "missing":
        return f"the request needs {field}.", field
    if err["type"] == "extra_forbidden":
        return f"{field} is not a field of this request.", field
    return f"{field}: {err['msg'][0].lower()}{err['msg'][1:]}, got {err.get('input')!r}.", field
