"""Quality of a generation graph on text: teacher-forced next-token logits, perplexity."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def next_token_logits(decoder, ids: list[int]) -> np.ndarray:
    """Logits predicting ids[1:], one decode step per token through the KV cache: [len(ids) - 1, V]."""
    logits, state = decoder.prefill([ids[:1]], capacity=len(ids))
    rows = [logits[0]]
    for token in ids[1:-1]:
        rows.append(decoder.step(state, np.array([token]))[0])
    return np.stack(rows)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def perplexity(decoder, texts_ids: Iterable[list[int]]) -> float:
    nll, count = 0.0, 0
    for ids in texts_ids:
        if len(ids) < 2:
            continue
        lp = log_softmax(next_token_logits(decoder, ids))
        nll -= float(lp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    return math.exp(nll / count)
