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
    """Rows of logits [B, V], the token taken at each [B]: each row's TokenLogprob with its top ``k``."""
    logits = np.asarray(logits, np.float32)
    rows = np.arange(len(logits))
    peak = logits.max(-1)
    shifted = logits - peak[:, None]
    lse = peak + np.log(np.exp(shifted, out=shifted).sum(-1))  # one temporary: this runs every step
    picked = logits[rows, chosen] - lse
    if k <= 0:
        return [TokenLogprob(int(t), float(lp)) for t, lp in zip(chosen, picked)]
    top = np.argpartition(logits, logits.shape[-1] - k, axis=-1)[:, -k:]
    top_values = logits[rows[:, None], top]
    order = np.argsort(-top_values, axis=-1, kind="stable")
    top, top_lp = np.take_along_axis(top, order, -1), np.take_along_axis(top_values, order, -1) - lse[:, None]
    return [TokenLogprob(int(t), float(lp), tuple(zip(ids.tolist(), lps.tolist())))
            for t, lp, ids, lps in zip(chosen, picked, top, top_lp)]
