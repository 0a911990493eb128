"""The model side of serving: a slot decoder, its KV pool (slots and a prefix store, allocated once)
and a decode step bound per batch width. It runs what the scheduler decided, and knows nothing of
requests."""

from __future__ import annotations

import time

import numpy as np

from ..runtime.backends import SlotDecoder


class ModelRunner:
    def __init__(self, decoder: SlotDecoder, max_batch: int, capacity: int, pad_id: int, prefix_blocks: int = 0,
                 block_size: int = 16):
        self.decoder, self.max_batch, self.capacity, self.pad_id = decoder, max_batch, capacity, pad_id
        self.pool = decoder.kv_pool(max_batch, capacity, prefix_blocks, block_size)
        self.steps: dict = {}  # n rows -> a step binding over pool slots 0 .. n-1, bound once
        # their logits rows, shared: one array per width would hold max_batch^2 / 2 rows (250 MB at 64)
        self.logits = decoder.logits_buffer(max_batch)

    def prefill(self, prompts: list[list[int]], start: int, cached: np.ndarray | None = None) -> np.ndarray:
        """Prompt tokens into slots start .. start+len-1, after ``cached`` positions each (None:
        empty slots); their last position's logits [B, V]."""
        return self.decoder.run_prefill(prompts, self.pool.views(start, start + len(prompts)), self.pad_id, cached)

    def decode(self, tokens: np.ndarray, cached: np.ndarray, idle: np.ndarray | None = None) -> np.ndarray:
        """One token per row for slots 0 .. len-1, after ``cached`` tokens each (``idle`` rows take
        none); logits [B, V]."""
        return self.step_binding(len(tokens)).run(tokens, cached, idle)

    def move(self, src: int, dst: int, length: int) -> None:
        self.pool.move(src, dst, length)

    def load(self, blocks: list[int], slot: int) -> None:
        """A cached prefix (store blocks, in order) into the first positions of ``slot``."""
        self.pool.load(blocks, slot)

    def save(self, slot: int, placed: list[tuple[int, int]]) -> None:
        """(block index, store block) pairs: those blocks of ``slot`` into the prefix store."""
        self.pool.save(slot, [i for i, _ in placed], [b for _, b in placed])

    def step_binding(self, rows: int):
        if rows not in self.steps:
            logits = None if self.logits is None else self.logits[:rows]
            self.steps[rows] = self.decoder.step_binding(self.pool.views(0, rows), logits)
        return self.steps[rows]

    def warm_up(self, prompt: list[int], full: bool = True) -> float:
        """Pay first-run costs before requests do; returns the seconds it took. Always: onnxruntime's
        first run. ``full``: the weights' move onto huge pages (it competes with requests while it
        runs), every page of the KV pool, a prompt group of each power-of-two size up to the batch,
        and a decode step at every batch width (each width binds its KV views once). What it writes
        into the pool is overwritten by the next prefill of each slot, never read."""
        t0 = time.perf_counter()
        self.prefill([prompt], 0)
        if full:
            self.decoder.settle()
            self.pool.touch()
            group_prompt = (prompt * 8)[:max(1, min(32, self.capacity - 1))]
            group = 1
            while group <= self.max_batch:
                self.prefill([group_prompt] * group, 0)
                group *= 2
            for width in range(1, self.max_batch + 1):
                self.decode(np.full(width, prompt[0], np.int64), np.full(width, len(group_prompt), np.int64))
        return time.perf_counter() - t0
