"""What the engine accepts: a request's prompt, lengths, choices, sampling and log-probabilities
checked by the runtime's own rules (runtime/generation/requests.py) against this engine's positions
per sequence and batch, before anything is queued."""

from __future__ import annotations

from ..runtime import CPMGenerator, GenerationError
from ..runtime.generation.logprobs import MAX_TOP
from ..runtime.generation.requests import check_choices, check_prompt_ids, fit_prompts, new_tokens, sampling_config
from .errors import ServeError
from .sequence import Request, ScoreRequest


class RequestError(ServeError, ValueError):
    """A request that cannot be served as asked (a client error; nothing else is disturbed);
    ``param`` names the field at fault when one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class RequestRules:
    def __init__(self, generator: CPMGenerator, capacity: int, max_batch: int):
        self.generator, self.capacity, self.max_batch = generator, capacity, max_batch

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids, checked against the vocabulary (raises GenerationError)."""
        if isinstance(prompt, str):
            return self.generator.prepare([prompt], None, 1, False).prompts[0]
        ids = list(prompt)
        check_prompt_ids(ids, self.generator.decodable)
        return ids

    def request(self, prompt: str | list[int], max_new_tokens: int, n: int = 1, timeout_s: float | None = None,
                sink=None, stream: bool = True, logprobs: int | None = None, **sampling) -> Request:
        try:
            ids = self.prompt_ids(prompt)
            if logprobs is not None and not 0 <= logprobs <= MAX_TOP:
                raise GenerationError(f"logprobs must be 0 to {MAX_TOP}")
            new = new_tokens(None, max_new_tokens, len(ids), self.capacity, name="max_tokens")
            fit_prompts([ids], new, self.capacity, owner="the", hint="the server holds that many per sequence "
                                                                     "(--max-total); shorten the prompt or lower max_tokens")
            check_choices(n, True, limit=self.max_batch, name="n")
            cfg = sampling_config(sampling, self.generator.decodable)
        except GenerationError as e:
            raise RequestError(str(e)) from None
        return Request(ids, new, cfg, n, timeout_s, sink or (lambda e: None), stream, logprobs)

    def score_request(self, prompts: list[str | list[int]], top: int, sink) -> ScoreRequest:
        try:
            rows = [self.prompt_ids(p) for p in prompts]
        except GenerationError as e:
            raise RequestError(str(e), param="prompt") from None
        if not 0 <= top <= MAX_TOP:
            raise RequestError(f"logprobs must be 0 to {MAX_TOP}", param="logprobs")
        positions = self.generator.n_positions
        if (longest := max(len(r) for r in rows)) > positions:
            raise RequestError(f"a prompt of {longest} tokens is longer than the model's {positions} positions",
                               param="prompt")
        return ScoreRequest(rows, top, sink)
