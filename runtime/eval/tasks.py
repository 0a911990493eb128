"""Candidate tasks: each example is a few candidate texts, the model scores each, the lowest mean
cross-entropy wins. What differs per task is only how a candidate becomes (prefix, scored) tokens.

``classify`` is a pure function of (scorer, encoded examples) -> predictions and scores: any
contiguous shard of the examples scores exactly as it does inside a full run, so workers can take
shards and their reports concatenate.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CPMError


EXAMPLES_PER_CALL = 8  # classify's examples per scorer call: shards of whole multiples score bit for bit alike


class EvalDataError(CPMError, ValueError):
    """Evaluation data that is missing, malformed or does not fit the model."""


@dataclass(frozen=True)
class Example:
    candidates: tuple[str, ...]  # what each candidate is called in the report (a label, an idiom)
    texts: tuple[tuple[str, str], ...]  # per candidate: (context, continuation) text
    label: int  # index of the right candidate
    where: str = ""  # for error messages: "dev.json line 12"


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]  # label names for the per-label table; () where candidates are not labels
    examples: tuple[Example, ...]
    # (tokenizer, example) -> per candidate (prefix ids, scored ids): the task's tokenization rule
    encode: Callable = field(repr=False)
    method: dict = field(default_factory=dict)  # what the report records of how the task was built
    total: int = 0  # examples in the whole file, --limit or not


Encoded = list[tuple[np.ndarray, np.ndarray]]  # per candidate: (prefix ids, scored ids), int32


def encode_examples(task: Task, tokenizer, n_positions: int,
                    on_progress: Callable[[int, int], None] | None = None) -> list[Encoded]:
    """Every candidate's tokens, checked to fit the model before any scoring starts."""
    out = []
    for i, ex in enumerate(task.examples):
        cands = []
        for name, (prefix, scored) in zip(ex.candidates, task.encode(tokenizer, ex)):
            if not prefix or not scored:
                raise EvalDataError(f"{ex.where}: candidate {name!r} encodes to no tokens to score")
            if (need := len(prefix) + len(scored) - 1) > n_positions:  # the last token is only predicted
                raise EvalDataError(f"{ex.where}: candidate {name!r} needs {need} positions; the model has "
                                    f"{n_positions}")
            cands.append((np.array(prefix, np.int32), np.array(scored, np.int32)))
        out.append(cands)
        if on_progress and (i % 256 == 255 or i == len(task.examples) - 1):
            on_progress(i + 1, len(task.examples))
    return out


def classify(scorer, encoded: Sequence[Encoded], on_progress: Callable[[int, int], None] | None = None,
             examples_per_call: int = EXAMPLES_PER_CALL) -> dict:
    """Predictions (first lowest score: ties never go to a later candidate) and scores (mean
    cross-entropy of each candidate's scored tokens) of every example."""
    scores: list[list[float]] = []
    for start in range(0, len(encoded), examples_per_call):
        chunk = encoded[start:start + examples_per_call]
        flat = [c for ex in chunk for c in ex]
        lps = scorer.logprobs([p.tolist() for p, _ in flat], [s.tolist() for _, s in flat])
        it = iter(lps)
        scores += [[float(-next(it).mean()) for _ in ex] for ex in chunk]
        if on_progress:
            on_progress(len(scores), len(encoded))
    return decided(scores)


def decided(scores: list[list[float]]) -> dict:
    """Each example's prediction, the first lowest score (ties never go to a later candidate)."""
    return {"predictions": [int(np.argmin(s)) for s in scores], "scores": scores}


def shard(items: Sequence, index: int, count: int) -> Sequence:
    """The ``index``-th of ``count`` contiguous, near-equal shards (0-based)."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index} of {count} does not exist")
    per, extra = divmod(len(items), count)
    start = index * per + min(index, extra)
    return items[start:start + per + (index < extra)]


def summarize(task: Task, predictions: list[int]) -> dict:
    gold = [e.label for e in task.examples]
    correct = sum(g == p for g, p in zip(gold, predictions))
    summary = {"examples": len(gold), "accuracy": correct / len(gold) if gold else float("nan")}
    if task.labels:
        per_label = {name: {"examples": 0, "correct": 0, "predicted": 0} for name in task.labels}
        for ex, p in zip(task.examples, predictions):
            per_label[ex.candidates[ex.label]]["examples"] += 1
            per_label[ex.candidates[ex.label]]["correct"] += int(ex.label == p)
            per_label[ex.candidates[p]]["predicted"] += 1
        summary["per_label"] = per_label
    return summary


def read_jsonl(path: Path, what: str = "JSON lines") -> list[tuple[int, dict]]:
    """(line number, object) of each non-empty line; ``what`` names the format in errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalDataError(f"cannot read {path}: {e}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path} line {n}: not {what}: {e}") from None
        if not isinstance(row, dict):
            raise EvalDataError(f"{path} line {n}: not {what} (a line is not a JSON object)")
        rows.append((n, row))
    return rows
