"""Left padding for graphs with an attention mask: rows end together at the last column."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, attention_mask and position_ids, each [B, S] int64. Positions count real tokens only,
    so a padded row sees the same positions as it would alone."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for b, r in enumerate(rows):
        if len(r):
            ids[b, width - len(r):], mask[b, width - len(r):] = r, 1
    return ids, mask, np.maximum(mask.cumsum(-1) - 1, 0)


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids and position_ids [B, S] int64, and lengths [B]: row b's tokens at 0 .. len - 1 (the
    shared-KV graphs' layout, with per-row lengths instead of a mask)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int64)
    pos = np.zeros((len(rows), width), np.int64)
    for b, r in enumerate(rows):
        ids[b, :len(r)], pos[b, :len(r)] = r, np.arange(len(r))
    return ids, pos, np.array([len(r) for r in rows], np.int64)
