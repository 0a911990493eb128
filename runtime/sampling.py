"""Next-token choice in numpy, vectorised over the batch: greedy, temperature, top-k, top-p,
repetition penalty, OpenAI's presence/frequency penalties and logit bias. Same seed, same tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
        logits = logits - cfg.frequency_penalty * counts - cfg.presence_penalty * (counts > 0)
    if cfg.logit_bias:
        ids, bias = zip(*cfg.logit_bias)
        added = np.zeros(logits.shape[-1], logits.dtype)
        np.add.at(added, list(ids), bias)
        logits = logits + added
    return logits


def filter_top_k_top_p(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Set logits outside the top-k and outside the nucleus to -inf. logits [B, V] float."""
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = np.partition(logits, V - top_k, axis=-1)[:, V - top_k: V - top_k + 1]  # [B, 1]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = _softmax(sorted_logits)
        # mass strictly before each token; keep the smallest prefix reaching top_p (never empty)
        before = np.concatenate([np.zeros_like(probs[:, :1]), np.cumsum(probs, axis=-1)[:, :-1]], axis=-1)
        drop_sorted = before >= top_p
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        logits = np.where(drop, -np.inf, logits)
    return logits


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def next_tokens(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator,
                seen: np.ndarray | None = None, counts: np.ndarray | None = None) -> np.ndarray:
    """logits [B, V] -> token ids [B] (int64). ``seen`` [B, V] bool feeds the repetition penalty,
    ``counts`` [B, V] the presence and frequency penalties."""
    logits = logits.astype(np.float32, copy=False)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    logits = apply_openai_penalties(logits, counts, cfg)
    if not cfg.do_sample:
        return logits.argmax(axis=-1).astype(np.int64)
    logits = filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    cdf = np.cumsum(_softmax(logits.astype(np.float64)), axis=-1)
    u = rng.random((logits.shape[0], 1)) * cdf[:, -1:]
    return np.minimum((cdf < u).sum(axis=-1), logits.shape[-1] - 1).astype(np.int64)
