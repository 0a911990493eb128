"""What the engine schedules: requests, their sequences (one per choice) with explicit states, and
the events it sends back. Nothing here knows of HTTP."""

from __future__ import annotations

import enum
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..runtime.generation.logprobs import TokenLogprob
from ..runtime.generation.sampling import SamplingConfig
from ..runtime.generation.step import SequenceDecoding
from .errors import ServeError


class EngineError(ServeError, RuntimeError):
    """The engine cannot take a request now (stopping, not loaded)."""


class QueueFull(EngineError):
    """The waiting queue is at its limit: try again shortly."""


class State(enum.Enum):
    WAITING = "waiting"  # queued, no KV slot yet
    PREFILLING = "prefilling"  # in a KV slot, its prompt going in chunk by chunk (idle in decode steps)
    RUNNING = "running"  # in a KV slot, prefilled, decoding one token per step
    FINISHED = "finished"  # slot freed; finish_reason says why


@dataclass(frozen=True)
class Event:
    """``token``: ``text`` became visible in choice ``index`` (with ``logprobs``: the tokens behind it,
    when the request asked for them); ``finish``: choice ``index`` ended (``reason`` stop / length /
    cancelled / timeout); ``error``: the request failed (``text`` says why)."""

    kind: str
    index: int = 0
    text: str = ""
    token_id: int = -1
    reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    n: int = 1
    timeout_s: float | None = None
    sink: Callable[[Event], None] = print
    stream: bool = True  # False: one token event with the whole text, just before each choice's finish
    logprobs: int | None = None  # with each token, its log-probability and this many alternatives
    id: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    sequences: list[Sequence] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list, repr=False)  # the prompt's prefix-cache block keys
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache instead of prefilled

    def cancel(self) -> None:
        """Ask the engine to drop this request; its slots are freed at the next step."""
        self.cancelled.set()

    def expired(self, now: float) -> bool:
        return self.timeout_s is not None and now - self.arrived > self.timeout_s

    @property
    def finished(self) -> bool:
        return bool(self.sequences) and all(s.state is State.FINISHED for s in self.sequences)


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int  # choice number within the request
    decoding: SequenceDecoding  # the runtime's per-sequence rules: sampling, stop strings, length
    state: State = State.WAITING
    finish_reason: str | None = None
    held: list[str] = field(default_factory=list)  # text pieces of a request that does not stream
    pending: list[TokenLogprob] = field(default_factory=list)  # log-probabilities not yet sent
    first_token_at: float | None = None
    last_token_at: float | None = None
    computed: int = 0  # prompt positions in its KV slot so far (PREFILLING)

    @property
    def generated(self) -> list[int]:
        return self.decoding.generated

    @property
    def cached(self) -> int:
        """Tokens in this sequence's KV slot: while prefilling, the prompt's positions so far; then
        the prompt and every generated token but the last."""
        if self.state is State.PREFILLING:
            return self.computed
        return len(self.request.prompt) + max(len(self.generated) - 1, 0)

    @property
    def to_prefill(self) -> int:
        return len(self.request.prompt) - self.computed if self.state is State.PREFILLING else 0

    def place(self, reused: int) -> None:
        """Into a KV slot whose first ``reused`` positions hold the prompt's start (a cached prefix)."""
        self.state, self.computed = State.PREFILLING, reused

    def start(self) -> None:
        """The whole prompt is in the slot: decode from here."""
        self.state, self.computed = State.RUNNING, len(self.request.prompt)

    def finish(self, reason: str) -> None:
        """The one place a sequence ends: stop / length / cancelled / timeout / error."""
        self.state, self.finish_reason = State.FINISHED, reason


def make_sequences(request: Request, generator) -> list[Sequence]:
    """One sequence per choice, built by the generator's own rule: a seeded choice 0 draws exactly
    what CPMGenerator draws for the same seed; choice j > 0 gets its own stream."""
    rows = [request.prompt] * request.n
    seqs = [Sequence(request, j, d) for j, d in
            enumerate(generator.sequences(rows, request.max_new_tokens, request.sampling, request.n))]
    request.sequences = seqs
    return seqs


@dataclass(eq=False)
class ScoreRequest:
    """Prompts to score, not to continue (an echoed prompt's log-probabilities): each row's tokens
    after its first, with ``top`` alternatives. ``sink`` receives the list of ``Positions`` (one per
    row), or the exception that failed them."""

    rows: list[list[int]]
    top: int
    sink: Callable[[object], None]
