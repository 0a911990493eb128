"""Parity of an exported graph against the PyTorch reference on fixed cases.

Reference outputs are computed first and kept (they are small), so the torch model can be freed
before onnxruntime loads the graph: a Large export never holds both copies of the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .model import CPMModel, positions_from_mask


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    seq: int
    past: int
    left_pad: tuple[int, ...] = ()  # padding tokens per row, counted over past + seq


CASES = (
    Case("b1_s17_p0", 1, 17, 0),
    Case("b1_s1_p9", 1, 1, 9),
    Case("b3_s17_p9", 3, 17, 9),
    Case("b3_s1_p0", 3, 1, 0),
    Case("b3_s17_p0_leftpad", 3, 17, 0, (0, 4, 11)),
    Case("b3_s1_p9_leftpad", 3, 1, 9, (0, 3, 6)),
)


@dataclass
class Expected:
    case: Case
    feeds: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    real: np.ndarray  # [B, S] bool: query positions holding real tokens


@torch.no_grad()
def reference(model: CPMModel, case: Case, seed: int = 0) -> Expected:
    """Feeds and reference outputs; a non-empty past comes from the reference's own prefill."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    B, S, P = case.batch, case.seq, case.past
    ids = torch.randint(0, cfg.vocab_size, (B, P + S), generator=g)
    mask = torch.ones(B, P + S, dtype=torch.long)
    for row, n in enumerate(case.left_pad):
        mask[row, :n] = 0
    pos = positions_from_mask(mask)
    past = None
    if P:
        _, past = model(ids[:, :P], mask[:, :P], pos[:, :P])
    logits, presents = model(ids[:, P:], mask, pos[:, P:], past)
    feeds = {"input_ids": ids[:, P:].numpy(), "attention_mask": mask.numpy(), "position_ids": pos[:, P:].numpy()}
    outputs = {"logits": logits.numpy()}
    empty = np.zeros((B, cfg.n_head, 0, cfg.head_dim), np.float32)
    for i in range(cfg.n_layer):
        feeds[f"past_key_values.{i}.key"] = past[i][0].numpy() if past else empty
        feeds[f"past_key_values.{i}.value"] = past[i][1].numpy() if past else empty
        outputs[f"present.{i}.key"], outputs[f"present.{i}.value"] = (t.numpy() for t in presents[i])
    return Expected(case, feeds, outputs, mask[:, P:].bool().numpy())


def compare(expected: Expected, actual: dict[str, np.ndarray], atol: float, rtol: float) -> dict:
    """One comparator: |a - e| <= atol + rtol * |e| elementwise, logits at real positions only."""
    real = expected.real
    worst_logit = worst_present = 0.0
    ok = True
    for name, e in expected.outputs.items():
        a = actual[name].astype(np.float32)
        last_only = name == "logits" and a.shape[1] == 1  # compared on the last position in _at_real
        if a.shape != e.shape and not last_only:
            return {"case": expected.case.name, "passed": False, "error": f"{name} shape {a.shape} != {e.shape}"}
        if name == "logits":
            e, a = _at_real(e, a, real)
        diff = np.abs(a - e)
        ok &= bool(np.all(np.isfinite(a))) and bool(np.all(diff <= atol + rtol * np.abs(e)))
        if name == "logits":
            worst_logit = float(diff.max(initial=0.0))
        else:
            worst_present = max(worst_present, float(diff.max(initial=0.0)))
    e_logits, a_logits = _at_real(expected.outputs["logits"], actual["logits"], real)
    e_top, a_top = e_logits.argmax(-1), a_logits.argmax(-1)
    return {"case": expected.case.name, "passed": ok, "logits_max_abs_diff": worst_logit,
            "presents_max_abs_diff": worst_present, "top1_agreement": float(np.mean(e_top == a_top))}


def _at_real(e: np.ndarray, a: np.ndarray, real: np.ndarray):
    """Logits at real query positions; a last-position-only graph is compared on the last one."""
    if a.shape[1] == 1 and e.shape[1] != 1:
        e, real = e[:, -1:], real[:, -1:]
    return e[real], a[real]


def run_parity(expected: list[Expected], infer: Callable[[dict], dict], atol: float, rtol: float,
               on_case: Callable[[int, int], None] | None = None) -> dict:
    results = []
    for i, exp in enumerate(expected):
        results.append(compare(exp, infer(exp.feeds), atol, rtol))
        if on_case:
            on_case(i + 1, len(expected))
    return {"atol": atol, "rtol": rtol, "passed": all(r["passed"] for r in results), "cases": results,
            "logits_max_abs_diff": max(r.get("logits_max_abs_diff", np.inf) for r in results),
            "presents_max_abs_diff": max(r.get("presents_max_abs_diff", np.inf) for r in results),
            "top1_agreement": min(r.get("top1_agreement", 0.0) for r in results)}
