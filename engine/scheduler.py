"""What runs next: the waiting queue, the rows in KV slots (row i holds slot i), which requests are
admitted, which prompt tokens each pass prefills, when a decode step is due, and compaction.
Pure bookkeeping: no model, no onnxruntime, no threads (the engine calls it under its own lock),
so it is tested on its own.

Prompts go in by chunks. While streams are decoding, a pass prefills at most ``prefill_tokens``
prompt tokens, first for the prompts already under way (oldest first), then for new requests; so a
long prompt costs each stream one chunk per step, never its whole length. With nothing decoding,
the first prompt in line goes in whole. With a prefix cache, a request starts from the longest
cached run of its prompt's blocks, and a request whose next block another prompt is prefilling
right now waits for it (a burst that shares a prefix computes it once).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .prefix_cache import PrefixCache
from .sequence import QueueFull, Request, Sequence, State


@dataclass(frozen=True)
class SchedulerLimits:
    max_batch: int = 16  # sequences decoded together (KV slots)
    max_queue: int = 64  # requests that may wait for a slot
    # prompt tokens prefilled between two decode steps while streams run (the chunk size): a long
    # prompt costs a running stream one chunk per token, not its whole length
    prefill_tokens: int = 32
    # while a burst is still being admitted, decode steps wait (new requests reach their first
    # token sooner), but running sequences never wait longer than this for their next token
    max_decode_delay_s: float = 0.1


@dataclass
class Plan:
    """One pass's prompt work."""

    admitted: list[Request] = field(default_factory=list)
    reused: list[tuple[Sequence, list[int]]] = field(default_factory=list)  # new rows and the store blocks they start from
    chunks: list[tuple[Sequence, int]] = field(default_factory=list)  # rows and the prompt tokens each prefills now


class Scheduler:
    def __init__(self, limits: SchedulerLimits, make_sequences: Callable[[Request], list[Sequence]],
                 prefix: PrefixCache | None = None):
        self.limits, self.make_sequences, self.prefix = limits, make_sequences, prefix
        self.waiting: deque[Request] = deque()
        self.rows: list[Sequence] = []  # rows[i] occupies KV slot i; finished rows hold theirs until compaction

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.rows

    @property
    def free_slots(self) -> int:
        return self.limits.max_batch - len(self.rows)

    @property
    def decoding(self) -> bool:
        return any(s.state is State.RUNNING for s in self.rows)

    def enqueue(self, request: Request) -> None:
        if len(self.waiting) >= self.limits.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting (--max-queue {self.limits.max_queue})")
        if self.prefix is not None:
            request.keys = self.prefix.keys(request.prompt)
        self.waiting.append(request)

    def expired_waiting(self, now: float) -> list[tuple[Request, str]]:
        """Waiting requests cancelled or past their timeout, taken out of the queue, with why."""
        gone = [(r, _why(r, now)) for r in self.waiting if _why(r, now)]
        for r, _ in gone:
            self.waiting.remove(r)
        return gone

    def expired_running(self, now: float) -> list[tuple[Sequence, str]]:
        """Sequences in slots whose request was cancelled or timed out, with why (still in their slots)."""
        return [(s, _why(s.request, now)) for s in self.rows
                if s.state is not State.FINISHED and _why(s.request, now)]

    # -- prompt work ------------------------------------------------------------------------------
    def plan(self) -> Plan:
        """This pass's prompt work: chunks for the prompts under way, oldest first, then new
        requests in order while slots and the token budget last. Requests that wait for a prefix
        being prefilled are passed over; more than half of those waiting are admitted when their
        prompts are short (a burst's median request then reaches its first token after one call)."""
        plan, budget = Plan(), _Budget(self.limits.prefill_tokens, whole_first=not self.decoding)
        under_way = sorted((s for s in self.rows if s.state is State.PREFILLING), key=lambda s: s.request.id)
        for s in under_way:
            budget.take(plan, s)
        in_flight = {k for s in under_way for k in s.request.keys[s.computed // self._block:]}
        free, quorum = self.free_slots, len(self.waiting) // 2 + 1
        for r in list(self.waiting):
            if r.n > free:
                break
            hit = self._cached_blocks(r)
            if len(r.keys) > hit and r.keys[hit] in in_flight:
                continue  # its next block is being computed: start from the cache once it is there
            cost = (len(r.prompt) - hit * self._block) * r.n
            short = len(plan.admitted) < quorum and cost <= self.limits.prefill_tokens
            if not (budget.left >= min(cost, budget.least) or budget.whole_first or short):
                break
            self.waiting.remove(r)
            blocks = self.prefix.match(r.prompt, r.keys, hit) if hit else []
            r.cached_tokens = len(blocks) * self._block
            for s in self.make_sequences(r):
                self.rows.append(s)
                s.place(r.cached_tokens)
                plan.reused.append((s, blocks))
                budget.take(plan, s, whole=short)
            plan.admitted.append(r)
            in_flight.update(r.keys[hit:])
            free -= r.n
        return plan

    def remember(self, s: Sequence) -> list[tuple[int, int]]:
        """After a chunk: the prompt's blocks now in ``s``'s slot into the prefix cache; returns
        (block index, store block) for each block to copy there."""
        if self.prefix is None or s.index:  # a request's choices share their prompt: its first one is kept
            return []
        return self.prefix.insert(s.request.prompt, s.request.keys, s.computed // self._block)

    @property
    def _block(self) -> int:
        return self.prefix.block_size if self.prefix is not None else 1

    def _cached_blocks(self, r: Request) -> int:
        """Blocks of ``r``'s prompt in the cache, leaving at least one token to prefill (its logits)."""
        if self.prefix is None:
            return 0
        return self.prefix.cached_run(r.keys[:(len(r.prompt) - 1) // self._block])

    # -- decoding -----------------------------------------------------------------------------------
    def decode_due(self, admitted: list[Request], now: float | None = None) -> bool:
        """Whether a decode step runs this pass: always while rows decode, unless a burst is still
        being admitted and no running row has waited ``max_decode_delay_s`` for its next token."""
        if not self.decoding:
            return False
        if not admitted or not self.waiting or self.free_slots == 0:
            return True
        oldest = min((s.last_token_at for s in self.rows if s.last_token_at is not None), default=None)
        now = time.perf_counter() if now is None else now
        return oldest is not None and now - oldest > self.limits.max_decode_delay_s

    def compact(self, move: Callable[[int, int, int], None]) -> None:
        """Free the slots of finished rows: the last live row moves into each (``move(src, dst,
        length)`` copies its cache), so live rows stay slots 0 .. n-1."""
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


class _Budget:
    """Prompt tokens a pass may still prefill; with ``whole_first``, the first prompt takes all it
    needs. A prompt that cannot finish in this pass takes a quarter of the budget or waits: a
    call's own cost would swamp a sliver."""

    def __init__(self, tokens: int, whole_first: bool):
        self.left, self.whole_first, self.least = tokens, whole_first, max(1, tokens // 4)

    def take(self, plan: Plan, s: Sequence, whole: bool = False) -> None:
        n = s.to_prefill if whole or self.whole_first else min(s.to_prefill, max(self.left, 0))
        if n < min(s.to_prefill, self.least):
            n = 0
        n = max(n, s.computed == 0)  # a row in a slot holds at least one position (decode steps skip it then)
        self.whole_first = False
        if n > 0:
            plan.chunks.append((s, n))
            self.left -= n


def _why(r: Request, now: float) -> str | None:
    return "cancelled" if r.cancelled.is_set() else "timeout" if r.expired(now) else None
