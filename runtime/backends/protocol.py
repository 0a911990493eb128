"""The decoder interface every backend implements, and the one generation, evaluation and serving
call: nothing above the backends probes for attributes.

``Decoder``: one generation call at a time. ``prefill`` runs the prompts and returns the last
prompt position's logits with the call's state; ``step`` feeds one token per row and returns the
next logits. ``SlotDecoder`` adds what continuous batching needs: KV memory the caller owns (a
pool of slots allocated once), prompts into some of its slots, and decode steps bound once per
batch width."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Decoder(Protocol):
    kind: str  # "concat", "shared" or "tensorrt": how the backend holds its KV cache
    n_layer: int
    n_head: int
    head_dim: int
    max_batch: int | None  # rows one call may take (a TensorRT profile); None: any

    def prefill(self, rows: list[list[int]], capacity: int, pad_id: int = 0) -> tuple[np.ndarray, Any]:
        """Prompts (ragged rows of ids) into a cache of ``capacity`` positions; logits [B, V] of
        each row's last prompt token, and the state ``step`` continues from."""

    def step(self, state: Any, tokens: np.ndarray) -> np.ndarray:
        """One token [B] per row after what ``state`` holds; logits [B, V]."""

    def own_graph_steps(self) -> AbstractContextManager:
        """Within it, every step runs on the decoder's own graph (not on a faster prompt graph for
        wide batches): for measuring that graph."""

    def settle(self) -> None:
        """Wait for work the load started in the background (moving the weights onto huge pages) to
        finish, so that it competes with no request."""


@runtime_checkable
class SlotDecoder(Decoder, Protocol):
    def kv_pool(self, max_batch: int, capacity: int, store_blocks: int = 0, block_size: int = 16):
        """KV memory for ``max_batch`` sequences of ``capacity`` positions, and a store of
        ``store_blocks`` blocks of ``block_size`` positions for shared prefixes (a KVPool)."""

    def run_prefill(self, rows: list[list[int]], past: list, pad_id: int = 0,
                    cached: np.ndarray | None = None) -> np.ndarray:
        """Prompt tokens into the slots ``past`` (views of a pool), each row after ``cached[b]``
        positions already there (None: empty slots); logits [B, V] of each row's last token."""

    def step_binding(self, past: list, logits: np.ndarray | None = None):
        """Decode steps over the slots ``past``, bound once: ``.run(tokens, cached, idle=None) ->
        logits``; ``idle`` rows take no token (a prompt still being prefilled)."""

    def logits_buffer(self, batch: int) -> np.ndarray | None:
        """An array steps of up to ``batch`` rows can write their logits into (None: any size)."""
