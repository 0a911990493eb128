"""The KV memory of a server or a job: one buffer per layer and kind, [max_batch, heads, capacity,
head_dim], allocated once (``SharedKVDecoder.kv_pool``). Running sequences occupy slots 0 .. n-1 (a dense prefix), so a step over n rows
binds the first n rows of every buffer, which are contiguous; a finished sequence's slot is filled
by moving the last one into it (only its used positions are copied)."""

from __future__ import annotations

import numpy as np


class KVPool:
    def __init__(self, n_buffers: int, max_batch: int, n_head: int, capacity: int, head_dim: int, dtype=np.float32):
        import onnxruntime as ort

        self._ort = ort
        self.max_batch, self.capacity = max_batch, capacity
        # separate arrays: an OrtValue over a numpy array shares its memory, and each layer's cache
        # is written in place by its own attention node
        self.buffers = [np.zeros((max_batch, n_head, capacity, head_dim), dtype) for _ in range(n_buffers)]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def touch(self) -> None:
        """Fault every page in now (numpy's zeros are mapped lazily), not during the first requests."""
        for b in self.buffers:
            b.fill(0)

    def views(self, start: int, stop: int) -> list:
        """OrtValues over slots start .. stop-1 of every buffer (no copy)."""
        return [self._ort.OrtValue.ortvalue_from_numpy(b[start:stop]) for b in self.buffers]

    def move(self, src: int, dst: int, length: int) -> None:
        """Slot src's first ``length`` positions into slot dst."""
        for b in self.buffers:
            b[dst, :, :length] = b[src, :, :length]
