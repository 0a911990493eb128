"""One completions request, from its JSON body to engine requests and back to OpenAI's completion
object: the rules cpm-serve's route and offline batch files share. Nothing here knows of HTTP."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError

from ..engine import Engine, RequestError
from ..engine.errors import ServeError
from ..engine.sequence import Event, Request, ScoreRequest
from ..runtime.generation.logprobs import TokenLogprob
from .openai_protocol import (DEFAULT_MAX_TOKENS, CompletionIds, CompletionRequest, FieldError, choice, error_body,
                              logprobs_body, usage, validation_error_body)


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
    try:
        body.check()
    except FieldError as e:
        raise BodyError.of(400, str(e), param=e.param) from None
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
        if body.max_tokens == 0 or next_from_scores(body):  # the scoring pass answers it whole
            for p in body.prompts():
                engine.prompt_ids(p)  # checked now: an echo alone reads them only to answer
            return []
        new = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        return [engine.make_request(p, new, body.n or 1, timeout_s, sink=sink_for(k), stream=bool(body.stream),
                                    logprobs=body.logprobs, **sampling)
                for k, p in enumerate(body.prompts())]
    except FieldError as e:
        raise BodyError.of(400, str(e), param=e.param) from None
    except (RequestError, ValueError) as e:
        raise BodyError.of(400, str(e)) from None


def next_from_scores(body: CompletionRequest) -> bool:
    """An echo with logprobs that asks for one greedy token (what evaluation clients send to score a
    text): the scoring pass's distribution after the prompt gives that token, no decoding needed."""
    if not (body.echo and body.logprobs is not None and body.max_tokens == 1 and (body.n or 1) == 1):
        return False
    s = body.sampling()
    return not (s["do_sample"] or s["stop"] or s["logit_bias"] or s["presence_penalty"] or s["frequency_penalty"]
                or s["repetition_penalty"] != 1.0)


def score_request(engine: Engine, body: CompletionRequest, sink: Callable[[object], None]) -> ScoreRequest | None:
    """The scoring an echo with logprobs needs (None: nothing to score); BodyError if refused."""
    if not (body.echo and body.logprobs is not None):
        return None
    try:  # at least one alternative: the one-token echo takes its token from it
        return engine.make_score_request(body.prompts(), max(body.logprobs, 1), sink)
    except RequestError as e:
        raise BodyError.of(400, str(e), param=e.param) from None


def scored(result: object) -> list:
    """A scoring sink's result: the positions, or the BodyError it failed with."""
    if isinstance(result, BaseException):
        if isinstance(result, ValueError):
            return BodyError.of(400, str(result), param="logprobs")
        return BodyError.of(500, f"scoring failed: {type(result).__name__}: {result}", "server_error")
    return result


class Choices:
    """One call's choices (one per prompt and n) as they are built: text, finish reason and
    log-probabilities each, the echoed prompt first when asked. Routes and batch files both answer
    through it, streaming or not."""

    def __init__(self, engine: Engine, body: CompletionRequest, requests: list[Request],
                 score: ScoreRequest | None = None):
        self.n, self.requests, self.logprobs = body.n or 1, requests, body.logprobs is not None
        self.top, self.eod_id = body.logprobs or 0, engine.generator.eod_id
        self.next_from_scores, self.generated = next_from_scores(body), 0
        self.text_of = _token_texts(engine.tokenizer)
        prompts = body.prompts()
        count = len(prompts) * self.n
        self.texts, self.reasons = [""] * count, [None] * count
        self.records: list[list[TokenLogprob]] = [[] for _ in range(count)]
        self.echo = [(p if isinstance(p, str) else engine.tokenizer.decode(p)) for p in prompts] if body.echo else None
        self.prompt_tokens = None if requests else [len(r) for r in score.rows] if score else [
            len(engine.prompt_ids(p)) for p in prompts]  # echo alone: no request counts them

    def echoed(self, positions: list | None) -> list[dict]:
        """The echoed prompts as choice chunks (one per choice), with their tokens' log-probabilities;
        with ``next_from_scores``, each prompt's greedy next token too, and its end."""
        out = []
        for k, text in enumerate(self.echo or []):
            records = _prompt_records(positions[k], self.top) if positions is not None else []
            for j in range(self.n):
                out.append(self.add(k * self.n + j, text, records))
            if self.next_from_scores:
                out.append(self._scored_token(k, positions[k]))
        return out

    def _scored_token(self, index: int, p) -> dict:
        token, lp = int(p.top_ids[-1][0]), float(p.top_logprobs[-1][0])
        self.generated += 1
        if token == self.eod_id:
            return self.add(index, "", reason="stop")
        top = tuple(zip(p.top_ids[-1][:self.top].tolist(), p.top_logprobs[-1][:self.top].tolist()))
        return self.add(index, self.text_of(token), [TokenLogprob(token, lp, top)], reason="length")

    def add(self, index: int, text: str, records=(), reason: str | None = None) -> dict:
        """Text (and the tokens behind it) for choice ``index``; returns it as a streamed choice."""
        offset = len(self.texts[index])
        self.texts[index] += text
        self.records[index] += records
        if reason is not None:
            self.reasons[index] = reason
        body = logprobs_body(list(records), self.text_of, offset) if self.logprobs else None
        return choice(index, text, reason, body)

    def take(self, index: int, ev: Event) -> dict:
        """An engine event (token or finish) into choice ``index``; returns it as a streamed choice."""
        if ev.kind == "token":
            return self.add(index, ev.text, ev.logprobs)
        return self.add(index, "", reason=ev.reason)

    def finish_echo_only(self) -> list[dict]:
        """max_tokens 0: every choice ends after its prompt (a one-token echo has ended already)."""
        return [self.add(i, "", reason="length") for i, r in enumerate(self.reasons) if r is None]

    def completion(self, ids: CompletionIds) -> dict:
        choices = [choice(i, t, r, logprobs_body(self.records[i], self.text_of) if self.logprobs else None)
                   for i, (t, r) in enumerate(zip(self.texts, self.reasons))]
        return ids.chunk(choices, self.usage())

    def usage(self) -> dict:
        if self.prompt_tokens is not None:  # echo alone
            return usage(sum(self.prompt_tokens), self.generated)
        return call_usage(self.requests)


def _prompt_records(p, top: int) -> list[TokenLogprob]:
    """A scored prompt's tokens (the ids are the row's): the first has no log-probability."""
    return [TokenLogprob(p.row[0], None)] + [
        TokenLogprob(t, float(lp), tuple(zip(ids[:top].tolist(), lps[:top].tolist())))
        for t, lp, ids, lps in zip(p.row[1:], p.logprobs, p.top_ids, p.top_logprobs)]


def _token_texts(tokenizer) -> Callable[[int], str]:
    cache: dict[int, str] = {}

    def text_of(token: int) -> str:
        if token not in cache:
            cache[token] = tokenizer.decode([token])
        return cache[token]
    return text_of


def failure(ev: Event) -> BodyError | None:
    """The error an event ends its call with, if it does."""
    if ev.kind == "error":
        return BodyError.of(500, ev.text, "server_error")
    if ev.kind == "finish" and ev.reason == "timeout":
        return BodyError.of(504, "the request timed out before it finished (--timeout)", "timeout")
    if ev.kind == "finish" and ev.reason == "cancelled":
        return BodyError.of(503, "the request was cancelled: the server is shutting down", "server_error")
    return None


def call_usage(requests: list[Request]) -> dict:
    return usage(sum(len(r.prompt) for r in requests), sum(len(s.generated) for r in requests for s in r.sequences),
                 sum(r.cached_tokens for r in requests))
