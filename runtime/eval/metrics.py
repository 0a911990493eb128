"""Quality of a generation graph on text: teacher-forced next-token logits, log-probabilities, perplexity."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

from .tasks import EvalDataError


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


def continuation_logprobs(decoder, prefixes: list[list[int]], continuations: list[list[int]],
                          pad_id: int = 0) -> list[np.ndarray]:
    """Per row, the log-probability of each continuation token given the prefix (and the tokens before
    it): one batched prefill, then one decode step per continuation position (rows may differ in
    length; a finished row is fed padding that is never read)."""
    steps = max(len(c) for c in continuations)
    capacity = max(len(p) for p in prefixes) + steps
    logits, state = decoder.prefill(prefixes, capacity, pad_id)
    out = np.zeros((len(prefixes), steps))
    for t in range(steps):
        tokens = np.array([c[t] if t < len(c) else pad_id for c in continuations], np.int64)
        out[:, t] = log_softmax(logits)[np.arange(len(tokens)), tokens]
        if t + 1 < steps:
            logits = decoder.step(state, tokens)
    return [out[b, :len(c)] for b, c in enumerate(continuations)]


def perplexity(decoder, texts_ids: Iterable[list[int]], batch: int = 1, pad_id: int = 0,
               on_progress: Callable[[int, int], None] | None = None) -> float:
    """Perplexity of texts (token ids; each first token is context only), ``batch`` texts at a time."""
    texts = [ids for ids in texts_ids if len(ids) >= 2]
    nll, count = _nll(lambda p, c: continuation_logprobs(decoder, p, c, pad_id), texts, batch, on_progress)
    return math.exp(nll / count)


def perplexity_of_lines(scorer, lines: Iterable[str], batch: int = 32,
                        on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Perplexity over texts (one per line, <eod> appended; a longer line is scored on its first
    n_positions tokens), ``batch`` lines per call of ``scorer.logprobs``."""
    tok = scorer.tokenizer
    texts = [(ids + [tok.eod_id])[:scorer.n_positions] for line in lines if line.strip() and (ids := tok.encode(line))]
    if not texts:
        raise EvalDataError("no text to score")
    nll, count = _nll(scorer.logprobs, texts, batch, on_progress)
    return {"lines": len(texts), "tokens": count, "perplexity": math.exp(nll / count)}


def _nll(logprobs: Callable, texts: list[list[int]], batch: int, on_progress) -> tuple[float, int]:
    """Summed negative log-likelihood of every token after each text's first, and how many tokens."""
    nll, count = 0.0, 0
    for start in range(0, len(texts), batch):
        chunk = texts[start:start + batch]
        lps = logprobs([t[:1] for t in chunk], [t[1:] for t in chunk])
        nll -= sum(float(lp.sum()) for lp in lps)
        count += sum(len(lp) for lp in lps)
        if on_progress:
            on_progress(min(start + batch, len(texts)), len(texts))
    return nll, count
