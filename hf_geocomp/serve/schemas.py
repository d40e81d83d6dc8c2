"""Request bodies (pydantic): types are checked strictly (``"10"`` is not a number); values against the limits in
:mod:`.app`, where the server's configuration is known.

The OpenAI-compatible bodies ignore fields they do not know (clients send their own extras), but refuse values
of known fields this server cannot honour (``n`` > 1, log-probabilities, penalties, tools) rather than answer
as if it had.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class GenerateRequest(BaseModel):
    """POST /generate and /generate?stream: one prompt, each model's generation."""

    model_config = ConfigDict(strict=True, extra="forbid")
    prompt: str
    max_new_tokens: int | None = None  # None: 64, or the server's limit if lower
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a random seed, reported in the answer (the same for both models)
    stop: list[str] = []
    ignore_eos: bool = False  # generate exactly max_new_tokens (equal work for timing)
    stream: bool = False  # server-sent events
    models: list[str] | None = None  # None: every served model


class ScoreRequest(BaseModel):
    """POST /score: each model's perplexity of ``text``."""

    model_config = ConfigDict(strict=True, extra="forbid")
    text: str
    prefill: int | None = None  # tokens read into the cache before the continuation is scored (None: half)


# What the OpenAI API lets a client ask that this server does not do: field → the value that asks for nothing.
UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "suffix": None, "logprobs": None, "top_logprobs": None,
               "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "tools": None, "functions": None}


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int | None = 1
    best_of: int | None = 1
    echo: bool | None = False
    suffix: str | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = 0
    frequency_penalty: float | None = 0
    logit_bias: dict | None = None
    tools: list | None = None
    functions: list | None = None

    def unsupported(self) -> str | None:
        """The first field asking for something this server does not do, else None."""
        for name, neutral in UNSUPPORTED.items():
            value = getattr(self, name, neutral)
            if value not in (neutral, None) and not (name == "logprobs" and value is False):
                return name
        return None


class CompletionRequest(_OpenAIRequest):
    prompt: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict]

    def text(self) -> str:
        """The message's text (a list of parts must be text parts)."""
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in self.content):
            raise ValueError("only text parts of messages are supported by this server")
        return "".join(part["text"] for part in self.content)


class ChatRequest(_OpenAIRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
