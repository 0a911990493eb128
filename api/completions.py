"""One completions request, from its JSON body to engine requests and back to OpenAI's completion
object: the rules cpm-serve's route and offline batch files share. Nothing here knows of HTTP."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError

from ..engine.errors import ServeError
from ..engine import Engine, RequestError
from .openai_protocol import (DEFAULT_MAX_TOKENS, CompletionIds, CompletionRequest, FieldError, choice, error_body,
                              usage, validation_error_body)
from ..engine.sequence import Event, Request


class BodyError(ServeError):
    """A body the server refuses: ``status`` and OpenAI's ``error`` object."""

    def __init__(self, status: int, body: dict):
        super().__init__(body["error"]["message"])
        self.status, self.body = status, body

    @classmethod
    def of(cls, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        return cls(status, error_body(message, type_, param))


def parse(raw: bytes | str | dict, engine: Engine, model_name: str) -> CompletionRequest:
    """A validated body, or BodyError (400 for a bad field, 404 for another model's name)."""
    try:
        body = (CompletionRequest.model_validate(raw) if isinstance(raw, dict)
                else CompletionRequest.model_validate_json(raw))
    except ValidationError as e:
        raise BodyError(400, validation_error_body(e)) from None
    if (field := body.unsupported()) is not None:
        raise BodyError.of(400, f"{field} is not supported by this server", param=field)
    if len(body.prompts()) * (body.n or 1) > engine.max_batch + engine.limits.max_queue:
        raise BodyError.of(400, f"{len(body.prompts())} prompts x n={body.n} is more than this server holds at once "
                                f"({engine.max_batch} running + {engine.limits.max_queue} waiting)", param="prompt")
    if body.model not in (None, model_name):
        raise BodyError.of(404, f"model {body.model!r} is not served here; it serves {model_name!r}", param="model")
    return body


def make_requests(engine: Engine, body: CompletionRequest, timeout_s: float | None,
                  sink_for: Callable[[int], Callable[[Event], None]]) -> list[Request]:
    """One engine request per prompt (``sink_for(k)`` receives prompt k's events: each piece of text
    when the body streams, else each choice's whole text at its end); BodyError if the engine
    refuses one (tokenizing happens here: call it off the event loop for long prompts)."""
    try:
        sampling = body.sampling()
        return [engine.make_request(p, body.max_tokens or DEFAULT_MAX_TOKENS, body.n or 1, timeout_s,
                                    sink=sink_for(k), stream=bool(body.stream), **sampling)
                for k, p in enumerate(body.prompts())]
    except FieldError as e:
        raise BodyError.of(400, str(e), param=e.param) from None
    except (RequestError, ValueError) as e:
        raise BodyError.of(400, str(e)) from None


def failure(ev: Event) -> BodyError | None:
    """The error an event ends its call with, if it does."""
    if ev.kind == "error":
        return BodyError.of(500, ev.text, "server_error")
    if ev.kind == "finish" and ev.reason == "timeout":
        return BodyError.of(504, "the request timed out before it finished (--timeout)", "timeout")
    if ev.kind == "finish" and ev.reason == "cancelled":
        return BodyError.of(503, "the request was cancelled: the server is shutting down", "server_error")
    return None


def completion(ids: CompletionIds, texts: list[str], reasons: list, requests: list[Request]) -> dict:
    """The completion object of a finished call: one choice per prompt and n, in order."""
    choices = [choice(i, t, r) for i, (t, r) in enumerate(zip(texts, reasons))]
    return ids.chunk(choices, call_usage(requests))


def call_usage(requests: list[Request]) -> dict:
    return usage(sum(len(r.prompt) for r in requests), sum(len(s.generated) for r in requests for s in r.sequences),
                 sum(r.cached_tokens for r in requests))
