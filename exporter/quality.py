"""Quantization that keeps its quality: when a plain int8/int4 variant misses its KL gate, find the
MatMuls that cost the accuracy and hold just those back, one rung at a time (quantize.py):
fp32 activations first (no size cost), then int8 weights (int4 only), then fp32.

For each rung: if holding back every MatMul at that rung meets the gate, a one-minimal set is
found by splitting (ddmin: O(k log n) builds for k sensitive MatMuls of n); otherwise the next
rung is tried. Every candidate is built and verified like the plain variant, so what is reported
is measured, not estimated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..optimize.quantize import RUNGS as QUANTIZE_RUNGS

# an int8 variant has no "int8 weights" rung to fall back to
RUNGS = {"int8": tuple(r for r in QUANTIZE_RUNGS if r != "int8"), "int4": QUANTIZE_RUNGS}


@dataclass
class Search:
    evaluate: Callable[[dict[str, str]], float]  # keep -> measured mean KL
    max_kl: float
    tried: dict[frozenset, float] = field(default_factory=dict)

    def passes(self, keep: dict[str, str]) -> bool:
        key = frozenset(keep.items())
        if key not in self.tried:  # ddmin asks some sets twice
            self.tried[key] = self.evaluate(keep)
        return self.tried[key] <= self.max_kl

    @property
    def best_kl(self) -> float:
        return min(self.tried.values(), default=float("inf"))


def fit_to_gate(precision: str, matmuls: list[str], search: Search) -> dict[str, str] | None:
    """The MatMuls to hold back (name -> rung), or None when no rung meets the gate."""
    for rung in RUNGS[precision]:
        if not search.passes({m: rung for m in matmuls}):
            continue
        return {m: rung for m in _ddmin(matmuls, [], lambda held: search.passes({m: rung for m in held}))}
    return None


def _ddmin(candidates: list[str], base: list[str], passes: Callable[[list[str]], bool]) -> list[str]:
    """A one-minimal subset S of candidates with passes(base + S), given passes(base + candidates)."""
    if not candidates or passes(base):
        return []
    if len(candidates) == 1:
        return candidates
    half = len(candidates) // 2
    a, b = candidates[:half], candidates[half:]
    if passes(base + a):
        return _ddmin(a, base, passes)
    if passes(base + b):
        return _ddmin(b, base, passes)
    kept_a = _ddmin(a, base + b, passes)
    return kept_a + _ddmin(b, base + kept_a, passes)
