"""Log-probabilities as the API reports them: from the model's own next-token distribution, taken
before temperature, penalties, logit bias and top-k / top-p (what vLLM reports by default), so a
token's number does not change with the sampling settings that chose it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_TOP = 5  # alternatives per position, as OpenAI's completions API allows


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token taken there, its log-probability, and the ``k`` most likely tokens
    with theirs, best first (ids)."""

    token: int
    logprob: float | None  # None: the first prompt token (nothing precedes it)
    top: tuple[tuple[int, float], ...] = ()


def logprobs_of(logits: np.ndarray, chosen: np.ndarray, k: int) -> list[TokenLogprob]:
    """Rows of logits [B, V], the token taken at each [B]: each row's TokenLogprob with its top ``k``.
    Runs every decode step of a request that asks: the top k come from k argmax passes (best first,
    ties to the lower id), cheaper than a partition of the whole vocabulary for k <= 5."""
    logits = np.asarray(logits, np.float32)
    rows = np.arange(len(logits))
    peak = logits.max(-1)
    shifted = logits - peak[:, None]
    lse = (peak + np.log(np.exp(shifted, out=shifted).sum(-1))).tolist()  # one temporary
    picked = logits[rows, chosen].tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in rows]
    if k > 0:
        work = logits.copy()
        for _ in range(k):
            best = work.argmax(-1)
            values = work[rows, best]
            work[rows, best] = -np.inf
            for row, (token, value) in enumerate(zip(best.tolist(), values.tolist())):
                tops[row].append((token, value - lse[row]))
    return [TokenLogprob(int(t), p - s, tuple(top)) for t, p, s, top in zip(chosen.tolist(), picked, lse, tops)]
