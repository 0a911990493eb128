"""The KV memory of a server or a job (``SharedKVDecoder.kv_pool``), allocated once:

- slots: one buffer per layer and kind, [max_batch, heads, capacity, head_dim]. Running sequences
  occupy slots 0 .. n-1 (a dense prefix), so a step over n rows binds the first n rows of every
  buffer, which are contiguous; a finished sequence's slot is filled by moving the last one into it
  (only its used positions are copied).
- a prefix store: [heads, blocks x block_size, head_dim] per layer and kind, where positions that
  prompts share are kept in blocks and copied into the slots of later sequences that begin with
  them. Which block holds which tokens is the engine's business (its prefix cache); the pool only
  copies, a run of consecutive blocks at a time (a prefix stored in one go sits in consecutive
  blocks, so a hit is one slice copy per head and buffer)."""

from __future__ import annotations

import numpy as np


class KVPool:
    def __init__(self, n_buffers: int, max_batch: int, n_head: int, capacity: int, head_dim: int, dtype=np.float32,
                 store_blocks: int = 0, block_size: int = 16):
        import onnxruntime as ort

        self._ort = ort
        self.max_batch, self.capacity, self.block_size = max_batch, capacity, block_size
        # separate arrays: an OrtValue over a numpy array shares its memory, and each layer's cache
        # is written in place by its own attention node
        self.buffers = [np.zeros((max_batch, n_head, capacity, head_dim), dtype) for _ in range(n_buffers)]
        self.store = [np.zeros((n_head, store_blocks * block_size, head_dim), dtype) for _ in range(n_buffers)]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers) + sum(s.nbytes for s in self.store)

    def touch(self) -> None:
        """Fault every page in now (numpy's zeros are mapped lazily), not during the first requests."""
        for b in self.buffers + self.store:
            b.fill(0)

    def views(self, start: int, stop: int) -> list:
        """OrtValues over slots start .. stop-1 of every buffer (no copy)."""
        return [self._ort.OrtValue.ortvalue_from_numpy(b[start:stop]) for b in self.buffers]

    def move(self, src: int, dst: int, length: int) -> None:
        """Slot src's first ``length`` positions into slot dst."""
        for b in self.buffers:
            b[dst, :, :length] = b[src, :, :length]

    def save(self, slot: int, indices: list[int], blocks: list[int]) -> None:
        """Blocks ``indices`` of ``slot`` (block i: positions i*block_size onwards) into store ``blocks``."""
        for first, block, n in _runs(indices, blocks, self.block_size):
            for b, s in zip(self.buffers, self.store):
                s[:, block:block + n] = b[slot, :, first:first + n]

    def load(self, blocks: list[int], slot: int) -> None:
        """Store ``blocks``, in order, into the first positions of ``slot``."""
        for first, block, n in _runs(range(len(blocks)), blocks, self.block_size):
            for b, s in zip(self.buffers, self.store):
                b[slot, :, first:first + n] = s[:, block:block + n]


def _runs(indices, blocks, size: int) -> list[tuple[int, int, int]]:
    """(first slot position, first store position, positions) of each run of blocks consecutive in both."""
    runs: list[list[int]] = []
    for i, b in zip(indices, blocks):
        if runs and runs[-1][0] + runs[-1][2] == i * size and runs[-1][1] + runs[-1][2] == b * size:
            runs[-1][2] += size
        else:
            runs.append([i * size, b * size, size])
    return [tuple(r) for r in runs]
