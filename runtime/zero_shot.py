"""Zero-shot classification by language-model scoring, as CPM-Generate's zero-shot-cls.py does it,
on any decoder of a bundle (onnxruntime graphs of every precision, TensorRT engines). No torch.

Each candidate text is a label prompt followed by the example's sentence; prompt and sentence are
tokenized separately and concatenated, the sentence cut to its first (seq_len - 20) tokens. The
score is the mean cross-entropy of exactly the sentence's tokens (the first predicted from the last
prompt token); the prediction is the candidate with the lowest score.

Scoring is teacher-forced through the decoder's own prefill/step interface: the prompts are
prefilled together, then the sentence tokens are fed one step at a time, so every graph (the
last-position generation graphs included) yields the log-probability of every sentence position.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .evaluate import continuation_logprobs, perplexity

SEQ_LEN = 128  # as the original scripts run it
TASKS = ("tnews", "iflytek", "ocnli")
OCNLI_PROMPTS = {"entailment": "？对，", "contradiction": "？错，", "neutral": "？也许，"}


class EvalDataError(ValueError):
    """Evaluation data that is missing or not in CLUE's JSON-lines format."""


@dataclass(frozen=True)
class Example:
    prompts: tuple[str, ...]  # one per candidate label
    sentence: str
    label: int  # index of the right candidate


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]
    examples: tuple[Example, ...]


def _read_jsonl(path: Path) -> list[dict]:
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalDataError(f"{path} is not CLUE JSON lines: {e}") from None
    if not all(isinstance(r, dict) for r in rows):
        raise EvalDataError(f"{path} holds lines that are not JSON objects")
    return rows


def _find(folder: Path, task: str, kind: str) -> Path:
    for name in (f"{kind}.json", f"{task}-{kind}.jsonl", f"{kind}.jsonl"):
        if (folder / name).is_file():
            return folder / name
    raise EvalDataError(f"no {kind}.json (or {task}-{kind}.jsonl) in {folder}")


def load_task(task: str, folder: str | Path, limit: int | None = None) -> Task:
    folder = Path(folder)
    if task not in TASKS:
        raise EvalDataError(f"unknown task {task!r}; choose {', '.join(TASKS)} or perplexity")
    if not folder.is_dir():
        raise EvalDataError(f"{folder} is not a folder with the task's dev.json (and labels.json)")
    dev = _read_jsonl(_find(folder, task, "dev"))
    try:
        if task == "ocnli":
            labels = tuple(OCNLI_PROMPTS)
            examples = [Example(tuple(r["sentence1"] + p for p in OCNLI_PROMPTS.values()), r["sentence2"],
                                labels.index(r["label"])) for r in dev if r.get("label") != "-"]
        else:
            desc = "label_desc" if task == "tnews" else "label_des"
            template = "这是关于{}的文章：" if task == "tnews" else "这是关于{}的应用程序："
            rows = _read_jsonl(_find(folder, task, "labels"))
            ids = [str(r["label"]) for r in rows]
            labels = tuple(r[desc] for r in rows)
            prompts = tuple(template.format(d) for d in labels)
            examples = [Example(prompts, r["sentence"], ids.index(str(r["label"]))) for r in dev]
    except (KeyError, ValueError, TypeError) as e:
        raise EvalDataError(f"{task} data in {folder} lacks or mislabels a field: {e}") from None
    return Task(task, labels, tuple(examples[:limit] if limit else examples))


def classify(generator, task: Task, batch: int = 32, seq_len: int = SEQ_LEN,
             on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Predictions and scores of every example. Candidate texts are scored ``batch`` rows at a time
    (an example's candidates together, several examples per call), never more rows than the decoder
    takes (a TensorRT engine's profile)."""
    tok = generator.tokenizer
    rows_per_call = min(batch, getattr(generator.decoder, "max_batch", batch))
    prompt_ids = {p: tok.encode(p) for ex in task.examples for p in ex.prompts}
    scores: list[list[float]] = []
    pending: list[tuple[int, list[int], list[int]]] = []  # (example, prompt ids, sentence ids)

    def flush():
        with own_graph_steps(generator.decoder):
            lps = continuation_logprobs(generator.decoder, [p for _, p, _ in pending], [c for *_, c in pending],
                                        tok.pad_id)
        for (i, _, _), lp in zip(pending, lps):
            scores[i].append(float(-lp.mean()))
        pending.clear()

    for i, ex in enumerate(task.examples):
        sentence = tok.encode(ex.sentence)[:seq_len - 20]
        if not sentence:
            raise EvalDataError(f"an example's sentence encodes to no tokens: {ex.sentence!r}")
        scores.append([])
        for k, prompt in enumerate(ex.prompts):
            pending.append((i, prompt_ids[prompt], sentence))
            if len(pending) == rows_per_call:
                flush()
                if on_progress:  # examples scored completely so far
                    on_progress(i + (k == len(ex.prompts) - 1), len(task.examples))
    if pending:
        flush()
    if on_progress:
        on_progress(len(task.examples), len(task.examples))
    return {"predictions": [int(np.argmin(s)) for s in scores], "scores": scores}


def own_graph_steps(decoder):
    """Scores measure the graph asked for at any rows per call: cpu-int4's steps stay 4-bit."""
    return decoder.own_graph_steps() if hasattr(decoder, "own_graph_steps") else nullcontext()


def summarize(task: Task, predictions: list[int]) -> dict:
    gold = [e.label for e in task.examples]
    per_label = {name: {"examples": 0, "correct": 0, "predicted": 0} for name in task.labels}
    for g, p in zip(gold, predictions):
        per_label[task.labels[g]]["examples"] += 1
        per_label[task.labels[g]]["correct"] += int(g == p)
        per_label[task.labels[p]]["predicted"] += 1
    correct = sum(g == p for g, p in zip(gold, predictions))
    return {"examples": len(gold), "accuracy": correct / len(gold) if gold else float("nan"), "per_label": per_label}


def perplexity_of_lines(generator, lines: Iterable[str], batch: int = 32,
                        on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Perplexity over texts (one per line, <eod> appended), ``batch`` lines at a time."""
    tok = generator.tokenizer
    limit = generator.n_positions  # a longer line is scored on its first n_positions tokens
    texts = [(ids + [tok.eod_id])[:limit] for line in lines if line.strip() and (ids := tok.encode(line))]
    if not texts:
        raise EvalDataError("no text to score")
    with own_graph_steps(generator.decoder):
        value = perplexity(generator.decoder, texts, batch, tok.pad_id, on_progress)
    return {"lines": len(texts), "tokens": sum(len(t) - 1 for t in texts), "perplexity": value}
