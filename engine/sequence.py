"""What the engine schedules: requests, their sequences (one per choice) with explicit states, and
the events it sends back. Nothing here knows of HTTP."""

from __future__ import annotations

import enum
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..runtime.generation.sampling import SamplingConfig
from ..runtime.generation.step import SequenceDecoding
from .errors import ServeError


class EngineError(ServeError, RuntimeError):
    """The engine cannot take a request now (stopping, not loaded)."""


class QueueFull(EngineError):
    """The waiting queue is at its limit: try again shortly."""


class State(enum.Enum):
    WAITING = "waiting"  # queued, no KV slot yet
    RUNNING = "running"  # in a KV slot, prefilled, decoding one token per step
    FINISHED = "finished"  # slot freed; finish_reason says why


@dataclass(frozen=True)
class Event:
    """``token``: ``text`` became visible in choice ``index``; ``finish``: choice ``index`` ended
    (``reason`` stop / length / cancelled / timeout); ``error``: the request failed (``text`` says why)."""

    kind: str
    index: int = 0
    text: str = ""
    token_id: int = -1
    reason: str | None = None


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
    id: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    sequences: list[Sequence] = field(default_factory=list)

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
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def generated(self) -> list[int]:
        return self.decoding.generated

    @property
    def cached(self) -> int:
        """Tokens in this sequence's KV slot: the prompt and every generated token but the last."""
        return len(self.request.prompt) + max(len(self.generated) - 1, 0)

    def start(self) -> None:
        self.state = State.RUNNING

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
