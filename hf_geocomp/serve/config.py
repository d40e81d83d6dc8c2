"""``ServeConfig``: what ``hf-geocomp serve`` serves, where, and the limits it enforces on every request."""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass

from ..options import check_value, option

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(kw_only=True)
class ServeConfig:
    """Serve a base and a compressed model side by side over HTTP: a page to try them, /generate, /score, and
    OpenAI-compatible /v1 endpoints.

    Args:
        base, compressed: the two models (bundled name, model folder, .gguf file or Hub id); a compressed folder
            reloads through hf_geocomp's quantizer and generates through its coded KV cache.
        host, port: where to listen (127.0.0.1 by default: only this machine).
        max_prompt_tokens: longest prompt (or /score text) in tokens; max_new_tokens: most tokens one request
            may ask for; max_concurrent: requests answered at once (more get 429); max_body_bytes: largest
            request body (larger get 413).
        dtype: dtype the models are loaded in; threads: torch threads (None: torch's default).
    """

    base: str = option(MISSING, "the base model: bundled name (smollm2-135m), folder, .gguf file or Hub id")
    compressed: str = option(MISSING, "the compressed model: a folder written by `hf-geocomp run` or `export`, "
                             "or any model as --base takes")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 exposes the server to the network)")
    port: int = option(8000, "port to listen on", range="[1, 65535]")
    max_prompt_tokens: int = option(1024, "longest prompt or /score text, in tokens", range="[1, inf)")
    max_new_tokens: int = option(256, "most new tokens one request may ask for", range="[1, inf)")
    max_concurrent: int = option(4, "requests answered at once; more are refused with 429", range="[1, inf)")
    max_body_bytes: int = option(1_000_000, "largest request body in bytes; larger are refused with 413",
                                 range="[1, inf)")
    dtype: str = option("float32", "dtype the models are loaded in", choices=DTYPES)
    threads: int | None = option(None, "torch threads (default: torch's own choice)", range="[1, inf)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_value(type(self), f.name, getattr(self, f.name))
