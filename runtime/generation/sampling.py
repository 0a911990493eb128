"""Next-token choice in numpy: greedy, temperature, top-k, top-p, repetition penalty, OpenAI's
presence/frequency penalties and logit bias. Penalties and greedy work on the whole batch at once;
sampled rows are drawn one by one (each sorts at most its nucleus). Same seed, same tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import CPMError

NUCLEUS_FIRST_GUESS = 64  # tokens sorted first for top-p; a trained model's nucleus is mostly smaller
PICK_BLOCK = 256  # tokens per block sum when drawing
MIN_TEMPERATURE = float(np.finfo(np.float32).tiny)


class NonFiniteLogits(CPMError, RuntimeError):
    """The graph gave NaN or +inf logits (or -inf everywhere): no token can be chosen from them."""


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; CTRL's penalty, as transformers applies it
    # OpenAI's: logit -= frequency * count + presence * (count > 0), counting generated tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit before sampling)
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.seed is not None and not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if any(not (isinstance(t, int) and t >= 0 and -100 <= b <= 100) for t, b in self.logit_bias):
            raise ValueError("logit_bias maps token ids (>= 0) to biases in [-100, 100]")

    @property
    def counts_tokens(self) -> bool:
        """Whether sampling needs each row's generated-token counts."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """logits [B, V]; seen [B, V] bool: tokens already in each row's context."""
    if penalty == 1.0:
        return logits
    scaled = np.where(logits < 0, logits * penalty, logits / penalty)
    return np.where(seen, scaled, logits)


def apply_openai_penalties(logits: np.ndarray, counts: np.ndarray | None, cfg: SamplingConfig) -> np.ndarray:
    """logits [B, V]; counts [B, V]: how often each row generated each token so far. Out of place."""
    if counts is not None and cfg.counts_tokens:
        c = counts.astype(logits.dtype)  # int counts would lift the logits to float64 (a slower exp after)
        logits = logits - cfg.frequency_penalty * c - cfg.presence_penalty * np.minimum(c, 1)
    if cfg.logit_bias:
        ids, bias = zip(*cfg.logit_bias)
        added = np.zeros(logits.shape[-1], logits.dtype)
        np.add.at(added, list(ids), bias)
        logits = logits + added
    return logits


def kept_tokens(x: np.ndarray, top_k: int, top_p: float) -> np.ndarray | None:
    """Ascending ids of the tokens top-k and then top-p keep; None keeps all. x [V]: one row's
    logits after temperature.

    The set a stable sort of all V would give (ties in id order; top-k keeps every tie at the k-th;
    top-p keeps the shortest sorted prefix whose mass reaches top_p), without that sort, which costs
    more than a decode step. The largest few, sorted, usually hold the nucleus; otherwise it is cut
    by value from the sorted values, ties at the cut taken in id order.
    """
    V = x.shape[0]
    ids = None
    if 0 < top_k < V:
        ids = np.flatnonzero(x >= np.partition(x, V - top_k)[V - top_k])
    if top_p >= 1.0:
        return ids
    xs = x if ids is None else x[ids]
    e = np.exp(xs - xs.max())  # float32 exp (much faster); sums in float64
    need, n, m = top_p * e.sum(dtype=np.float64), len(xs), NUCLEUS_FIRST_GUESS
    chosen = None
    if n > m:
        top = np.flatnonzero(xs >= np.partition(xs, n - m)[n - m])  # the m largest and their ties
        order = top[np.argsort(-xs[top], kind="stable")]
        keep = _prefix_reaching(e[order], need)
        if keep < len(order):
            chosen = np.sort(order[:keep])
    if chosen is None:
        v = np.sort(xs)[::-1]
        keep = _prefix_reaching(np.exp(v - v[0]), need)
        cut = v[keep - 1]
        mask = xs > cut
        mask[np.flatnonzero(xs == cut)[:keep - np.count_nonzero(mask)]] = True
        chosen = np.flatnonzero(mask)
    return chosen if ids is None else ids[chosen]


def _prefix_reaching(weights: np.ndarray, need: float) -> int:
    """How many of ``weights`` (in order) to keep: each whose mass ahead is still under ``need``."""
    before = np.concatenate(([0.0], np.cumsum(weights, dtype=np.float64)[:-1]))
    return int(np.count_nonzero(before < need))  # a prefix: ``before`` never decreases


def _draw(x: np.ndarray, cfg: SamplingConfig, r: float) -> int:
    kept = kept_tokens(x, cfg.top_k, cfg.top_p)
    xs = x if kept is None else x[kept]
    i = _pick(np.exp(xs - xs.max()), r)
    return i if kept is None else int(kept[i])


def _pick(w: np.ndarray, r: float) -> int:
    """An index drawn with probability proportional to w [n] (float32, >= 0, some > 0) for r
    uniform in [0, 1): the first whose running sum reaches (1 - r) of the total, found through
    block sums so that no float64 running sum covers all n (float32 weights, float64 sums)."""
    n = len(w)
    full = n - n % PICK_BLOCK
    sums = w[:full].reshape(-1, PICK_BLOCK).sum(axis=1, dtype=np.float64)
    if full < n:
        sums = np.append(sums, w[full:].sum(dtype=np.float64))
    cum = np.cumsum(sums)
    target = (1.0 - r) * cum[-1]  # in (0, total]: the token it lands on has weight > 0
    b = min(int(np.searchsorted(cum, target)), len(cum) - 1)
    block = w[b * PICK_BLOCK:(b + 1) * PICK_BLOCK]
    j = int(np.searchsorted(np.cumsum(block, dtype=np.float64), target - (cum[b - 1] if b else 0.0)))
    if j >= len(block) or block[j] == 0:  # the two sums' rounding differ: the block's last real token
        j = int(np.flatnonzero(block)[-1])
    return b * PICK_BLOCK + j


def next_tokens(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator,
                seen: np.ndarray | None = None, counts: np.ndarray | None = None) -> np.ndarray:
    """logits [B, V] -> token ids [B] (int64). ``seen`` [B, V] bool feeds the repetition penalty,
    ``counts`` [B, V] the presence and frequency penalties."""
    logits = logits.astype(np.float32, copy=False)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    logits = apply_openai_penalties(logits, counts, cfg)
    top = logits.max(axis=-1)  # NaN if any is; -inf masks single tokens, never all
    if not np.isfinite(top).all():
        row = int(np.flatnonzero(~np.isfinite(top))[0])
        raise NonFiniteLogits(f"the graph's logits are not finite (row {row}: max {top[row]}); its precision "
                              "overflowed or its weights are broken, and no token can be chosen")
    if not cfg.do_sample:
        return logits.argmax(axis=-1).astype(np.int64)
    draws = rng.random(logits.shape[0])
    with np.errstate(over="ignore"):  # a tiny temperature sends all but the largest to -inf, as it should
        # max first, so nothing overflows to +inf; temperatures under float32's smallest would divide by 0
        scaled = (logits - top[:, None]) / max(cfg.temperature, MIN_TEMPERATURE)
    return np.array([_draw(row, cfg, r) for row, r in zip(scaled, draws)], np.int64)
