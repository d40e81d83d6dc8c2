"""OpenAI-compatible routes: POST /v1/completions, POST /v1/chat/completions (both with ``stream``), GET /v1/models.

``model`` picks a served model by name (``base`` or ``compressed``); a chat's prompt is written by that
model's tokenizer's chat template. Answers carry OpenAI's fields (``usage`` included) and, under
``geocomp``, what the generation cost (latency, tokens/s, KV cache bytes); streams are server-sent events of
chunks ending in ``data: [DONE]``, with a usage chunk when ``stream_options.include_usage`` asks for it.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import GeoCompError
from .app import SSE_HEADERS, Server, failure, sse, stream_models
from .engine import Generation, ServedModel
from .limits import ServeError
from .schemas import ChatRequest, CompletionRequest

router = APIRouter(prefix="/v1")
COMPLETION_DEFAULT_TOKENS = 16  # the OpenAI API's default max_tokens for /v1/completions


def _server(request: Request) -> Server:
    return request.app.state.server


def _card(model: ServedModel, created: int) -> dict:
    return {"id": model.name, "object": "model", "created": created, "owned_by": "hf-geocomp", "source": model.source}


@router.get("/models")
async def list_models(request: Request):
    server, now = _server(request), int(time.time())
    return {"object": "list", "data": [_card(m, now) for m in server.models.values()]}


@router.get("/models/{name}")
async def get_model(name: str, request: Request):
    return _card(_server(request).pick([name])[0], int(time.time()))


def _usage(g: Generation) -> dict:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.generated_tokens,
            "total_tokens": g.prompt_tokens + g.generated_tokens}


def _cost(g: Generation) -> dict:
    return {k: getattr(g, k) for k in ("latency_s", "time_to_first_token_s", "tokens_per_s", "kv_cache_bytes",
                                       "kv_cache_bytes_used", "seed")}


async def _answer(server: Server, req, ids_of, max_tokens: int | None, default_tokens: int, chat: bool):
    """The shared body of both routes: check, generate (or stream), and shape the answer as OpenAI's."""
    unsupported = req.unsupported()
    if unsupported:
        raise ServeError(400, f"{unsupported} is not supported by this server; leave it at its default.", unsupported)
    model = server.pick([req.model])[0]
    ids = ids_of(model)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    sampling = server.sampling(default_tokens if max_tokens is None else max_tokens, req.temperature, req.top_p,
                               req.seed, stop, field="max_tokens")
    kind = "chat.completion" if chat else "text_completion"
    rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": kind, "created": created, "model": model.name}

    def choice(text: str | None, finish: str | None, role: bool = False) -> dict:
        if not chat:
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        if finish is not None and text is None:
            return {"index": 0, "delta": {}, "finish_reason": finish}
        return {"index": 0, "delta": {**({"role": "assistant"} if role else {}), "content": text or ""},
                "finish_reason": finish}

    if not req.stream:
        try:
            g = await run_in_threadpool(model.generate, ids, sampling)
        except Exception as e:  # noqa: BLE001 — the other model and the server go on
            raise ServeError(500, f"model {model.name!r} failed: {failure(model, e)}") from None
        first = ({"index": 0, "message": {"role": "assistant", "content": g.text}, "finish_reason": g.finish_reason}
                 if chat else choice(g.text, g.finish_reason))
        return {**head, "choices": [first], "usage": _usage(g), "geocomp": _cost(g)}

    include_usage = bool((req.stream_options or {}).get("include_usage"))
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    async def events():
        if chat:
            yield sse(None, {**head, "object": chunk_kind, "choices": [choice("", None, role=True)]})
        async for kind_, _, value in stream_models([(model, ids, sampling)]):
            if kind_ == "text":
                yield sse(None, {**head, "object": chunk_kind, "choices": [choice(value, None)]})
            elif kind_ == "error":
                yield sse(None, {"error": {"message": f"model {model.name!r} failed: {value}", "type": "server_error",
                                           "param": None, "code": 500}})
            else:
                yield sse(None, {**head, "object": chunk_kind, "choices": [choice(None, value.finish_reason)],
                                 "geocomp": _cost(value)})
                if include_usage:
                    yield sse(None, {**head, "object": chunk_kind, "choices": [], "usage": _usage(value)})
        yield sse(None, "[DONE]")
    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/completions")
async def completions(req: CompletionRequest, request: Request):
    server = _server(request)
    return await _answer(server, req, lambda m: server.prompt_ids(m, req.prompt), req.max_tokens,
                         COMPLETION_DEFAULT_TOKENS, chat=False)


@router.post("/chat/completions")
async def chat_completions(req: ChatRequest, request: Request):
    server = _server(request)
    if not req.messages:
        raise ServeError(400, "messages must hold at least one message.", "messages")
    try:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    except ValueError as e:
        raise ServeError(400, f"{e}.", "messages") from None

    def ids_of(model: ServedModel) -> list[int]:
        try:
            ids = model.chat_ids(messages)
        except GeoCompError as e:
            raise ServeError(400, str(e), "messages") from None
        except Exception as e:  # noqa: BLE001 — a template that refuses these messages (e.g. a role it lacks)
            raise ServeError(400, f"model {model.name!r}'s chat template refused these messages: {e}", "messages") \
                from None
        return server.prompt_ids(model, "", "messages", ids)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return await _answer(server, req, ids_of, max_tokens, server.config.max_new_tokens, chat=True)
