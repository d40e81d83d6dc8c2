"""Limits every request meets before a route runs, and the one shape of every error answer.

Errors are OpenAI's shape, ``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``, on every
endpoint, so the ``openai`` client shows the message and a browser or ``curl`` reads one sentence.
"""

from __future__ import annotations

from starlette.responses import JSONResponse


class ServeError(Exception):
    """A request this server refuses or could not answer: an HTTP status and one sentence."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error"}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                                   "param": param, "code": status}}, status_code=status)


class Gate:
    """Requests being answered now on the limited paths, and the most allowed at once."""

    def __init__(self, max_concurrent: int):
        self.max_concurrent, self.in_flight = max_concurrent, 0


class Limits:
    """ASGI middleware: a body above ``max_body_bytes`` gets 413 (read no further than the limit, with or
    without a Content-Length); a request on ``paths`` beyond the gate's ``max_concurrent`` gets 429. A
    request holds its place until its answer is sent in full, a stream included."""

    def __init__(self, app, max_body_bytes: int, gate: Gate, paths: tuple[str, ...]):
        self.app, self.max_body_bytes, self.gate, self.paths = app, max_body_bytes, gate, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_response(413, f"the request body is larger than this server's limit of "
                                        f"{self.max_body_bytes} bytes (hf-geocomp serve --max-body-bytes).")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await error_response(400, "the Content-Length header is not a number.")(scope, receive, send)
            if int(length) > self.max_body_bytes:
                return await too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                return await too_large(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        limited = scope["path"] in self.paths
        if limited and self.gate.in_flight >= self.gate.max_concurrent:
            return await error_response(429, f"this server answers at most {self.gate.max_concurrent} requests at "
                                             f"once (hf-geocomp serve --max-concurrent); retry when one has finished.")(
                scope, receive, send)
        self.gate.in_flight += limited
        try:
            await self.app(scope, replay, send)
        finally:
            self.gate.in_flight -= limited
