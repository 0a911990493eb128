"""Parity of an exported graph against the PyTorch reference on fixed cases.

Reference outputs are computed first and kept (they are small), so the torch model can be freed
before onnxruntime loads the graph: a Large export never holds both copies of the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..runtime.eval.metrics import log_softmax
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


def reference(model: CPMModel, case: Case, seed: int = 0) -> Expected:
    """Feeds and reference outputs; a non-empty past comes from the reference's own prefill.

    Computed on one torch thread: with two, the trained test model's logits came out 2.3e-4 away
    from their usual values in about one pytest session of three (its matmuls' summation order
    moved with the process's state), more than the 1e-4 gate; onnxruntime's stayed within 4e-6.
    One thread gives one summation order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference(model, case, seed)
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def _reference(model: CPMModel, case: Case, seed: int) -> Expected:
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


def mean_kl(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean KL(reference || variant) of the next-token distributions, rows of [N, V]."""
    lp, lq = log_softmax(ref), log_softmax(got)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def metrics(case: str, logits: tuple[np.ndarray, np.ndarray], presents: list[tuple[np.ndarray, np.ndarray]],
            atol: float, rtol: float) -> dict:
    """One comparator: |a - e| <= atol + rtol * |e| elementwise; logits as [N, V] rows."""
    e_log, a_log = logits[0], logits[1].astype(np.float32)
    ok = bool(np.all(np.isfinite(a_log)))
    worst_present = 0.0
    for e, a in presents:
        diff = np.abs(a.astype(np.float32) - e)
        ok &= bool(np.all(np.isfinite(a))) and bool(np.all(diff <= atol + rtol * np.abs(e)))
        worst_present = max(worst_present, float(diff.max(initial=0.0)))
    diff = np.abs(a_log - e_log)
    ok &= bool(np.all(diff <= atol + rtol * np.abs(e_log)))
    return {"case": case, "passed": ok, "logits_max_abs_diff": float(diff.max(initial=0.0)),
            "presents_max_abs_diff": worst_present,
            "top1_agreement": float(np.mean(e_log.argmax(-1) == a_log.argmax(-1))), "mean_kl": mean_kl(e_log, a_log)}


def _at_real(e: np.ndarray, a: np.ndarray, real: np.ndarray):
    """Logits at real query positions; a last-position-only graph is compared on the last one."""
    if a.shape[1] == 1 and e.shape[1] != 1:
        e, real = e[:, -1:], real[:, -1:]
    return e[real], a[real]


def compare(expected: Expected, actual: dict[str, np.ndarray], atol: float, rtol: float) -> dict:
    """The exporter's standard graphs: logits at real positions, presents whole."""
    for name, e in expected.outputs.items():
        a = actual[name]
        if a.shape != e.shape and not (name == "logits" and a.shape[1] == 1):
            return {"case": expected.case.name, "passed": False, "error": f"{name} shape {a.shape} != {e.shape}"}
    logits = _at_real(expected.outputs["logits"], actual["logits"], expected.real)
    presents = [(e, actual[n]) for n, e in expected.outputs.items() if n != "logits"]
    return metrics(expected.case.name, logits, presents, atol, rtol)


def shared_kv_inputs(exp: Expected, capacity: int) -> tuple[dict, dict, list[tuple[int, int, int]]]:
    """A case in the shared-KV interface: each row's real past at the front of a max-length buffer,
    the new chunk right-padded with per-row lengths. Returns feeds, past buffers, and per row
    (pads in the past, pads in the chunk, real tokens in all)."""
    P = exp.feeds["past_key_values.0.key"].shape[2]
    mask = exp.feeds["attention_mask"]
    B, S = exp.feeds["input_ids"].shape
    ids, pos = np.zeros((B, S), np.int64), np.zeros((B, S), np.int64)
    rows = []
    for b in range(B):
        pad_past, pad_new = int((mask[b, :P] == 0).sum()), int((mask[b, P:] == 0).sum())
        rows.append((pad_past, pad_new, P - pad_past + S - pad_new))
        ids[b, :S - pad_new] = exp.feeds["input_ids"][b, pad_new:]
        pos[b, :S - pad_new] = exp.feeds["position_ids"][b, pad_new:]
    past = {}
    for name, value in exp.feeds.items():
        if name.startswith("past_key_values."):
            buf = np.zeros((B, value.shape[1], capacity, value.shape[3]), value.dtype)
            for b, (pad_past, _, _) in enumerate(rows):
                buf[b, :, :P - pad_past] = value[b, :, pad_past:]
            past[name] = buf
    totals = np.array([r[2] for r in rows])
    feeds = {"input_ids": ids, "position_ids": pos, "seqlens_k": (totals - 1).astype(np.int32),
             "total_sequence_length": np.array(totals.max(), np.int32),
             "query_seqlens": np.array([S - r[1] for r in rows], np.int32)}
    return feeds, past, rows


def compare_shared_kv(exp: Expected, actual: dict[str, np.ndarray], rows, atol: float, rtol: float) -> dict:
    logits = (exp.outputs["logits"][:, -1], actual["logits"][:, 0])  # left padding: the last position is real
    presents = []
    for name, e in exp.outputs.items():
        if name.startswith("present."):
            for b, (pad_past, pad_new, total) in enumerate(rows):
                presents.append((e[b, :, pad_past + pad_new:], actual[name][b, :, :total]))
    return metrics(exp.case.name, logits, presents, atol, rtol)


def run_parity(expected: list[Expected], infer: Callable, atol: float, rtol: float,
               on_case: Callable[[int, int], None] | None = None, shared_kv_capacity: int | None = None) -> dict:
    """Every case through ``infer``; with ``shared_kv_capacity``, ``infer(feeds, past)`` takes the
    shared-KV interface (see shared_kv_inputs)."""
    results = []
    for i, exp in enumerate(expected):
        if shared_kv_capacity:
            feeds, past, rows = shared_kv_inputs(exp, shared_kv_capacity)
            results.append(compare_shared_kv(exp, infer(feeds, past), rows, atol, rtol))
        else:
            results.append(compare(exp, infer(exp.feeds), atol, rtol))
        if on_case:
            on_case(i + 1, len(expected))
    return summarise(results, atol, rtol)


def summarise(results: list[dict], atol: float, rtol: float) -> dict:
    return {"atol": atol, "rtol": rtol, "passed": all(r["passed"] for r in results), "cases": results,
            "logits_max_abs_diff": max(r.get("logits_max_abs_diff", np.inf) for r in results),
            "presents_max_abs_diff": max(r.get("presents_max_abs_diff", np.inf) for r in results),
            "top1_agreement": min(r.get("top1_agreement", 0.0) for r in results),
            "mean_kl": max(r.get("mean_kl", np.inf) for r in results)}


def score_parity(expected: list[Expected], logprobs: Callable, gate: dict) -> dict:
    """A scoring graph (``logprobs(prefixes, continuations)``, as runtime scorers take them) against
    the reference's log-probability of each next token, on the cases without past. ``gate``:
    ``max_abs_diff`` or ``mean_abs_diff`` of the log-probabilities."""
    cases = []
    for exp in expected:
        if exp.case.past or exp.case.seq < 2:
            continue
        pads = exp.case.left_pad or (0,) * exp.case.batch  # a left-padded row is its real tokens alone
        rows = [ids[n:] for ids, n in zip(exp.feeds["input_ids"], pads)]
        logits = [lg[n:] for lg, n in zip(exp.outputs["logits"], pads)]
        got = np.concatenate(logprobs([r[:1].tolist() for r in rows], [r[1:].tolist() for r in rows]))
        want = np.concatenate([log_softmax(lg[:-1])[np.arange(len(r) - 1), r[1:]] for lg, r in zip(logits, rows)])
        diff = np.abs(got - want) if np.all(np.isfinite(got)) else np.full_like(want, np.inf)
        measured = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}
        cases.append({"case": exp.case.name, "passed": all(measured[k] <= v for k, v in gate.items()),
                      **{f"logprobs_{k}": v for k, v in measured.items()}})
    return {"gate": gate, "passed": all(c["passed"] for c in cases), "cases": cases,
            **{f"logprobs_{k}": max(c[f"logprobs_{k}"] for c in cases) for k in ("max_abs_diff", "mean_abs_diff")}}
