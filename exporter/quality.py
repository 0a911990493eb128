"""Quality gates, in one place: what each precision must meet against the fp32 PyTorch reference,
the check of every variant and scoring twin through the runtime decoder that will run it, and the
hold-back search when a quantized variant misses.

Hold-back: when a plain int8/int4 variant misses its KL gate, find the MatMuls that cost the
accuracy and hold just those back, one rung at a time (quantize.py): fp32 activations first (no
size cost), then int8 weights (int4 only), then fp32. For each rung: if holding back every MatMul
at that rung meets the gate, a one-minimal set is found by splitting (ddmin: O(k log n) builds for
k sensitive MatMuls of n); otherwise the next rung is tried. Every candidate is built and verified
like the plain variant, so what is reported is measured, not estimated.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..optimize import variants
from ..optimize.quantize import RUNGS as QUANTIZE_RUNGS
from ..runtime.backends import open_decoder
from ..runtime.backends.session import OnnxRuntimeRunner
from .errors import ParityError
from .verify import mean_kl, run_parity, score_parity, shared_kv_inputs

SHARED_KV_CAPACITY = 32  # >= the longest verification case (past 9 + 17)

# Verification gates against the fp32 PyTorch reference. fp32 is held elementwise; reduced
# precisions by the mean KL divergence of their next-token distributions (top-1 agreement is
# reported but not gated: on random weights the distributions are nearly flat and top-1 is a
# coin toss, while KL stays meaningful at any sharpness).
GATES = {
    "fp32": {"atol": 1e-3, "rtol": 1e-3},
    "fp16": {"max_mean_kl": 1e-3},
    "int8": {"max_mean_kl": 1e-2},
    "int4": {"max_mean_kl": 1e-1},
}

# Scoring graphs (score_graph.py) against the reference's log-probabilities: fp32 elementwise, as
# generation; reduced precisions are held by their generation graph's KL gate, and their twin's mean
# gap only catches a broken rewrite (a few outlier positions of a held-back model reach 1-2 nats).
SCORE_GATES = {"fp32": {"max_abs_diff": 1e-3}, "fp16": {"mean_abs_diff": 0.5}, "int8": {"mean_abs_diff": 0.5},
               "int4": {"mean_abs_diff": 1.0}, "kv-int8": {"mean_abs_diff": 0.5}}

# An int8 KV cache against the same graph with an fp32 cache: the mean KL of next-token
# distributions over decode steps that read the quantized cache, after a short and a long context.
KV_GATE = {"max_mean_kl": 1e-3}
KV_STEPS = 32

# an int8 variant has no "int8 weights" rung to fall back to
RUNGS = {"int8": tuple(r for r in QUANTIZE_RUNGS if r != "int8"), "int4": QUANTIZE_RUNGS}


class QualityGate:
    """The gates of one export: ``expected`` holds the reference's outputs for the verification
    cases; ``max_kl`` (the user's) replaces the KL gates; ``fallback`` allows holding back."""

    def __init__(self, folder: Path, config: dict, expected, max_kl: float | None = None, fallback: bool = True,
                 threads: int | None = None):
        self.folder, self.config, self.expected = folder, config, expected
        self.max_kl, self.fallback, self.threads = max_kl, fallback, threads

    def kl_limit(self, precision: str) -> float:
        return self.max_kl if self.max_kl is not None else GATES[precision]["max_mean_kl"]

    def passes(self, report: dict, precision: str) -> bool:
        if "atol" in GATES[precision]:
            return report["passed"]
        return report["mean_kl"] <= self.kl_limit(precision)

    def verify(self, variant: variants.Variant) -> dict:
        """The variant against the reference, through the runtime decoder that serves it."""
        gate = GATES[variant.precision]
        atol, rtol = gate.get("atol", float("inf")), gate.get("rtol", 0.0)
        if variant.kv_cache == "shared":
            prefill = self.folder / variant.prefill["file"] if variant.prefill else None
            decoder = open_decoder(self.folder / variant.file, self.config, "shared", threads=self.threads,
                                   prefill_path=prefill)
            report = run_parity(self.expected, decoder.infer, atol, rtol, shared_kv_capacity=SHARED_KV_CAPACITY)
        else:
            runner = OnnxRuntimeRunner(self.folder / variant.file, threads=self.threads)
            report = run_parity(self.expected, runner.infer, atol, rtol)
        # a KL-gated variant passes case by case on its KL, so a parity table marks its misses
        return report if "atol" in gate else _mark_kl_misses(report, self.kl_limit(variant.precision))

    def entry(self, variant: variants.Variant, report: dict | None = None) -> dict:
        """The variant's manifest entry with its parity report and the gate it met."""
        entry = variant.manifest_entry()
        entry["parity"] = report if report is not None else self.verify(variant)
        entry["gate"] = dict(GATES[variant.precision])
        if self.max_kl is not None and "max_mean_kl" in entry["gate"]:
            entry["gate"] = {"max_mean_kl": self.max_kl}
        return entry

    def enforce(self, key: str, label: str, variant: variants.Variant, entry: dict,
                rebuild: Callable[[dict], variants.Variant], progress) -> dict:
        """``entry`` if its variant meets the gate; else a held-back rebuild that does, or ParityError."""
        report = entry["parity"]
        if self.passes(report, variant.precision):
            return entry
        if variant.precision not in RUNGS or not self.fallback:
            raise ParityError(report, self.miss_message(label, variant.precision, report))
        cost = {"plain_data_bytes": (self.folder / variant.data).stat().st_size, "plain_step_ms": self.step_ms(variant),
                "plain_mean_kl": report["mean_kl"]}

        def evaluate(keep):
            progress(len(search.tried))
            return self.verify(rebuild(keep))["mean_kl"]

        search = Search(evaluate, self.kl_limit(variant.precision))
        keep = fit_to_gate(variant.precision, variants.quantized_matmuls(self.folder, variant), search)
        if keep is None:
            raise ParityError(report, self.miss_message(label, variant.precision, report, search.best_kl))
        final = rebuild(keep)
        held = self.entry(final)
        held["held_back"] = {**cost, "kept": keep, "builds": len(search.tried) + 1,
                             "data_bytes": (self.folder / final.data).stat().st_size, "step_ms": self.step_ms(final)}
        return held

    def miss_message(self, key: str, precision: str, report: dict, best: float | None = None) -> str:
        gate = GATES[precision]
        if "max_mean_kl" not in gate:
            return f"{key} misses its gate {gate} (logits max |Δ| {report['logits_max_abs_diff']:.3g})"
        limit = self.kl_limit(precision)
        tried = ("" if precision not in RUNGS else
                 "; --no-fallback was given" if not self.fallback else
                 f"; holding every MatMul back (fp32 activations, int8 weights, fp32) reached at best mean KL {best:.3g}"
                 if best is not None else "")
        return (f"{key} misses its gate: mean KL {report['mean_kl']:.3g} > {limit:g} (top-1 "
                f"{report['top1_agreement']:.0%}){tried}; export a higher precision, or accept a looser gate with "
                f"--max-kl {max(report['mean_kl'], best or 0) * 1.5:.2g}")

    def check_score(self, key: str, precision: str, logprobs: Callable) -> dict:
        """A scoring twin against the reference's log-probabilities; raises VariantError on a miss."""
        report = score_parity(self.expected, logprobs, SCORE_GATES[precision])
        if not report["passed"]:
            (what, limit), = report["gate"].items()
            raise variants.VariantError(f"the scoring graph of {key} misses its gate: log-probabilities "
                                        f"{what.replace('_', ' ')} {report[f'logprobs_{what}']:.3g} > {limit:g}; "
                                        "no bundle was written")
        return report

    def kv_cache(self, key: str, plain: dict, kv8: dict, rows: list[list[int]]) -> dict:
        """The int8-cache graph ``kv8`` against ``plain`` (manifest entries: file, prefill), teacher-forced
        along ``rows``: KV_STEPS decode steps after a short context and after a long one (the model's
        positions less the steps: 992 of CPM's 1024). Raises VariantError when it misses KV_GATE."""
        n = self.config["n_positions"]
        contexts = sorted({min(16, n // 4), n - KV_STEPS - 1})
        decoders = [open_decoder(self.folder / g["file"], self.config, "shared", threads=self.threads,
                                 prefill_path=self.folder / g["prefill"]["file"] if g.get("prefill") else None)
                    for g in (plain, kv8)]
        kls, agree = [], []
        for row in rows:
            for context in contexts:
                (la, sa), (lb, sb) = (d.prefill([row[:context]], context + KV_STEPS + 1) for d in decoders)
                for token in row[context:context + KV_STEPS]:
                    kls.append(mean_kl(la, lb))
                    agree.append(bool(la.argmax() == lb.argmax()))
                    step = np.array([token], np.int64)
                    la, lb = decoders[0].step(sa, step), decoders[1].step(sb, step)
        report = {"mean_kl": float(np.mean(kls)), "max_kl": float(np.max(kls)), "top1_agreement": float(np.mean(agree)),
                  "contexts": contexts, "steps": KV_STEPS, "rows": len(rows), "gate": KV_GATE,
                  "passed": float(np.mean(kls)) <= KV_GATE["max_mean_kl"]}
        if not report["passed"]:
            raise variants.VariantError(f"{key} with an int8 KV cache misses its gate: mean KL {report['mean_kl']:.3g} "
                                        f"> {KV_GATE['max_mean_kl']:g} against its fp32 cache; export without "
                                        "--kv-cache int8, or calibrate on text like yours (--kv-calibration)")
        return report

    def step_ms(self, variant: variants.Variant, repeats: int = 10) -> float:
        """Median time of one decode step at batch 1 (the b1_s1_p9 case), for the cost report."""
        case = next(e for e in self.expected if e.case.batch == 1 and e.case.seq == 1)
        feeds, past = shared_kv_inputs(case, SHARED_KV_CAPACITY)[:2]
        decoder = open_decoder(self.folder / variant.file, self.config, "shared", threads=1)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            decoder.infer(feeds, {k: v.copy() for k, v in past.items()})
            times.append(time.perf_counter() - t0)
        return round(1000 * sorted(times)[len(times) // 2], 3)


def _mark_kl_misses(report: dict, max_kl: float) -> dict:
    """A KL-gated report: each case passes by its own mean KL (the elementwise check is off)."""
    for case in report["cases"]:
        case["passed"] = case.get("mean_kl", float("inf")) <= max_kl
    report["passed"] = all(c["passed"] for c in report["cases"])
    return report


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
