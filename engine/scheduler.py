"""What runs next: the waiting queue, the running rows (row i holds KV slot i), admission under a
prompt-token budget, when a decode step is due, and compaction. Pure bookkeeping: no model, no
onnxruntime, no threads (the engine calls it under its own lock), so it is tested on its own."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .sequence import QueueFull, Request, Sequence, State


@dataclass(frozen=True)
class SchedulerLimits:
    max_batch: int = 16  # sequences decoded together (KV slots)
    max_queue: int = 64  # requests that may wait for a slot
    # prompt tokens prefilled per pass (at least one request): a burst of arrivals is prefilled in
    # groups between decode steps, so the first of them start streaming early
    prefill_tokens: int = 128
    # while a burst is still being admitted, decode steps wait (new requests reach their first
    # token sooner), but running sequences never wait longer than this for their next token
    max_decode_delay_s: float = 0.1


class Scheduler:
    def __init__(self, limits: SchedulerLimits):
        self.limits = limits
        self.waiting: deque[Request] = deque()
        self.rows: list[Sequence] = []  # rows[i] occupies KV slot i; finished rows hold theirs until compaction

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.rows

    @property
    def free_slots(self) -> int:
        return self.limits.max_batch - len(self.rows)

    def enqueue(self, request: Request) -> None:
        if len(self.waiting) >= self.limits.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting (--max-queue {self.limits.max_queue})")
        self.waiting.append(request)

    def expired_waiting(self, now: float) -> list[tuple[Request, str]]:
        """Waiting requests cancelled or past their timeout, taken out of the queue, with why."""
        gone = [(r, _why(r, now)) for r in self.waiting if _why(r, now)]
        for r, _ in gone:
            self.waiting.remove(r)
        return gone

    def expired_running(self, now: float) -> list[tuple[Sequence, str]]:
        """Running sequences whose request was cancelled or timed out, with why (still in their slots)."""
        return [(s, _why(s.request, now)) for s in self.rows if s.state is State.RUNNING and _why(s.request, now)]

    def admit(self) -> list[Request]:
        """Waiting requests that fit the free slots, in order, up to the prompt-token budget, and at
        least half of those waiting: a burst's median request then reaches its first token after one
        prefill, not two (a group's prompts cost less each than one by one)."""
        admitted, free, budget = [], self.free_slots, self.limits.prefill_tokens
        quorum = (len(self.waiting) + 1) // 2
        while self.waiting and self.waiting[0].n <= free:
            cost = len(self.waiting[0].prompt) * self.waiting[0].n
            if admitted and cost > budget and len(admitted) >= quorum:
                break
            req = self.waiting.popleft()
            free, budget = free - req.n, budget - cost
            admitted.append(req)
        return admitted

    def decode_due(self, admitted: list[Request], now: float | None = None) -> bool:
        """Whether a decode step runs this pass: always, unless a burst is still being admitted and
        no running row has waited ``max_decode_delay_s`` for its next token."""
        if not self.rows:
            return False
        if not admitted or not self.waiting or self.free_slots == 0:
            return True
        oldest = min((s.last_token_at for s in self.rows if s.last_token_at is not None), default=None)
        now = time.perf_counter() if now is None else now
        return oldest is not None and now - oldest > self.limits.max_decode_delay_s

    def compact(self, move: Callable[[int, int, int], None]) -> None:
        """Free the slots of finished rows: the last running row moves into each (``move(src, dst,
        length)`` copies its cache), so running rows stay slots 0 .. n-1."""
        rows, i = self.rows, 0
        while i < len(rows):
            if rows[i].state is not State.FINISHED:
                i += 1
                continue
            last = rows.pop()
            if i < len(rows) and last.state is not State.FINISHED:
                move(len(rows), i, last.cached)
                rows[i] = last
                i += 1

    def requests_of(self, seqs: list[Sequence]) -> list[Request]:
        """Each request of ``seqs`` once, in order."""
        return list({id(s.request): s.request for s in seqs}.values())


def _why(r: Request, now: float) -> str | None:
    return "cancelled" if r.cancelled.is_set() else "timeout" if r.expired(now) else None
