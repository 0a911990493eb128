"""OpenAI's completions API as pydantic models, and the response shapes (plain and streamed).

Fields follow the OpenAI reference; ``top_k`` and ``repetition_penalty`` are extra fields (the
openai client passes them with ``extra_body``). Unknown fields are ignored, as OpenAI does; known
fields of the wrong type are refused with the field named, and known fields this server cannot
honour (best_of, suffix) are refused rather than ignored.

``logprobs`` (0 to 5) reports each token's log-probability under the model's own distribution,
before temperature, penalties, bias and top-k / top-p, and that many alternatives; ``echo`` puts
the prompt in front of the completion, with its tokens' log-probabilities when ``logprobs`` is set
(the first has none: null), scored in one pass on the bundle's scoring graph. CPM's vocabulary has
no byte pieces: every token is whole characters, so a token's text is its piece decoded alone.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from itertools import accumulate
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..engine.errors import ServeError
from ..runtime.generation.logprobs import MAX_TOP, TokenLogprob

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_LOGIT_BIAS = 1024  # entries: bounds the per-step work one request can ask for
PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of token-id lists"


class FieldError(ServeError, ValueError):
    """A field that validates alone but not as this server reads it; ``param`` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: (str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)]
             | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)])
    max_tokens: Annotated[int, Field(ge=0)] | None = DEFAULT_MAX_TOKENS  # 0: with echo, score the prompt only
    temperature: Annotated[float, Field(ge=0, le=2)] | None = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] | None = 1.0
    top_k: Annotated[int, Field(ge=0)] | None = 0
    repetition_penalty: Annotated[float, Field(gt=0)] | None = 1.0
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = 0.0
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    n: Annotated[int, Field(ge=1)] | None = 1
    stop: str | Annotated[list[str], Field(max_length=8)] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP)] | None = None
    best_of: int | None = None
    suffix: str | None = None
    user: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or (a list of ints) one prompt already tokenized."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return [p if isinstance(p, str) else list(p) for p in self.prompt]

    def sampling(self) -> dict:
        """Engine sampling keywords. temperature 0 means greedy, as in OpenAI's API."""
        temperature = 1.0 if self.temperature is None else self.temperature
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stop):
            raise FieldError("stop", "stop strings must not be empty")
        bias = self.logit_bias or {}
        if not all(k.isascii() and k.isdigit() for k in bias):
            raise FieldError("logit_bias", "logit_bias keys must be token ids (decimal integers)")
        return {"do_sample": temperature > 0, "temperature": temperature or 1.0, "top_p": self.top_p or 1.0,
                "top_k": self.top_k or 0, "repetition_penalty": self.repetition_penalty or 1.0,
                "presence_penalty": self.presence_penalty or 0.0, "frequency_penalty": self.frequency_penalty or 0.0,
                "logit_bias": tuple(sorted((int(k), float(v)) for k, v in bias.items())),
                "seed": self.seed, "stop": tuple(stop)}

    def check(self) -> None:
        """Fields that are valid alone but not together (FieldError)."""
        if self.echo and (self.n or 1) > 1:
            raise FieldError("n", "echo with n > 1 is not supported (the prompt would be echoed n times)")
        if self.max_tokens == 0 and not self.echo:
            raise FieldError("max_tokens", "max_tokens 0 generates nothing: it is only for echo (scoring the prompt)")

    def unsupported(self) -> str | None:
        if self.best_of not in (None, 1, self.n):
            return "best_of"
        if self.suffix:
            return "suffix"
        return None


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def validation_error_body(error: ValidationError, prompt_shapes: str = PROMPT_SHAPES) -> dict:
    e = error.errors()[0]
    if not e["loc"]:  # the body itself: not JSON, or not an object
        return error_body(f"the request body: {e['msg']}")
    if e["loc"][0] == "prompt" and e["type"] != "missing":  # four shapes: pydantic's first miss names one
        return error_body(f"prompt must be {prompt_shapes}", param="prompt")
    field = ".".join(str(p) for p in e["loc"] if not isinstance(p, int) or len(e["loc"]) == 1)
    return error_body(f"{field}: {e['msg']}", param=str(e["loc"][0]))


class CompletionIds:
    """The id, timestamp and model name shared by every chunk of one response."""

    def __init__(self, model: str):
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body


def choice(index: int, text: str, finish_reason: Literal["stop", "length"] | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def logprobs_body(records: list[TokenLogprob], text_of: Callable[[int], str], offset: int = 0) -> dict:
    """OpenAI's completions ``logprobs`` object for ``records``, the first starting at character
    ``offset`` of the choice's text. Alternatives map text to log-probability, best first; two
    tokens of one text keep the better one."""
    tokens = [text_of(r.token) for r in records]
    tops = []
    for r in records:
        top: dict[str, float] = {}
        for token, lp in r.top:
            top.setdefault(text_of(token), lp)
        tops.append(None if r.logprob is None else top)
    return {"tokens": tokens, "token_logprobs": [r.logprob for r in records], "top_logprobs": tops,
            "text_offset": list(accumulate([offset] + [len(t) for t in tokens[:-1]]))[:len(tokens)]}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage; ``cached_tokens``: prompt tokens reused from the prefix cache, not prefilled."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def models_list(model: str) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "cpm-deploy"}]}
