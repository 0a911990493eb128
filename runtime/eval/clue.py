"""TNEWS, IFLYTEK and OCNLI as CPM-Generate's ``zero-shot-cls.py`` scores them for the model card.

A candidate is a prompt naming the label followed by the example's sentence, tokenized apart and
concatenated; the sentence is cut to its first ``seq_length - 20`` tokens (OCNLI's second sentence
is never cut); its tokens alone are scored. Since the script's commit f130230 (2022-07-05), the
setting behind the published TNEWS and IFLYTEK numbers, each example has four candidates: three
wrong labels drawn with Python's ``random.sample`` and the gold label last, from one generator
seeded once per run (1234, the script's default, for TNEWS; 5 for IFLYTEK, as its shell script
passes). Draws run over the dev file in order, so the first N examples get the same candidates
whether or not ``--limit`` stops after them.
"""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

from .tasks import EvalDataError, Example, Task, read_jsonl

TASKS = ("tnews", "iflytek", "ocnli")
SEQ_LENGTH = 1024  # MAXSEQLEN in all three zero-shot scripts
SEEDS = {"tnews": 1234, "iflytek": 5}
SAMPLED = 3  # wrong labels per example
PROMPTS = {"tnews": "这是关于{}的文章：", "iflytek": "这是关于{}的应用程序："}
DESC_FIELD = {"tnews": "label_desc", "iflytek": "label_des"}
OCNLI_PROMPTS = {"entailment": "？对，", "contradiction": "？错，", "neutral": "？也许，"}
SOURCE = "TsinghuaAI/CPM-1-Generate zero-shot-cls.py and scripts/zero-shot-*.sh at f130230 (2022-07-05)"


def _find(folder: Path, task: str, kind: str) -> Path:
    for name in (f"{kind}.json", f"{task}-{kind}.jsonl", f"{kind}.jsonl"):
        if (folder / name).is_file():
            return folder / name
    raise EvalDataError(f"no {kind}.json (or {task}-{kind}.jsonl) in {folder}")


def load_task(task: str, folder: str | Path, limit: int | None = None, candidates: str = "sampled",
              seed: int | None = None, seq_length: int = SEQ_LENGTH) -> Task:
    """The dev set of ``task`` in CLUE's JSON-lines layout (``dev.json``, ``labels.json``).

    ``candidates``: "sampled" (the published method) or "all" (every label, the script's old
    default); OCNLI always has its three. ``seed`` overrides the task's published seed."""
    folder = Path(folder)
    if task not in TASKS:
        raise EvalDataError(f"unknown task {task!r}; choose {', '.join(TASKS)}")
    if candidates not in ("sampled", "all"):
        raise EvalDataError(f"candidates must be 'sampled' or 'all', not {candidates!r}")
    if seq_length <= 20:
        raise EvalDataError(f"a sequence length of {seq_length} leaves no sentence tokens (they are cut to length - 20)")
    if not folder.is_dir():
        raise EvalDataError(f"{folder} is not a folder with the task's dev.json (and labels.json)")
    dev = read_jsonl(_find(folder, task, "dev"), "CLUE JSON lines")
    if task == "ocnli":
        labels, examples = tuple(OCNLI_PROMPTS), _ocnli(dev)
        method = {"candidates": "all", "seq_length": None}
    else:
        seed = SEEDS[task] if seed is None else seed
        labels, examples = _labelled(task, dev, read_jsonl(_find(folder, task, "labels"), "CLUE JSON lines"),
                             random.Random(seed) if candidates == "sampled" else None)
        method = {"candidates": candidates, "seq_length": seq_length, "sentence_tokens": seq_length - 20,
                  **({"seed": seed} if candidates == "sampled" else {})}
    return Task(task, labels, tuple(examples[:limit] if limit else examples),
                partial(_encode, None if task == "ocnli" else seq_length - 20),
                {"source": SOURCE, **method}, total=len(examples))


def _labelled(task: str, dev: list, label_rows: list, rng: random.Random | None) -> tuple[tuple, list[Example]]:
    desc = DESC_FIELD[task]
    try:
        labels = [str(r[desc]) for _, r in label_rows]
        by_id = {str(r["label"]): str(r[desc]) for _, r in label_rows}  # TNEWS reads gold through this map
    except KeyError as e:
        raise EvalDataError(f"{task} labels.json: a line lacks the field {e}") from None
    if rng is not None and len(set(labels)) <= SAMPLED:
        raise EvalDataError(f"sampled candidates need more than {SAMPLED} labels; labels.json has {len(set(labels))}")
    examples = []
    for n, row in dev:
        where = f"dev.json line {n}"
        try:
            gold = by_id[str(row["label"])] if task == "tnews" else str(row[desc])
            sentence = row["sentence"]
        except KeyError as e:
            raise EvalDataError(f"{where}: no field {e}, or a label that labels.json does not list") from None
        if gold not in labels or not isinstance(sentence, str):
            raise EvalDataError(f"{where}: label {gold!r} is not in labels.json, or the sentence is not text")
        if rng is None:
            cands, label = labels, len(labels) - 1 - labels[::-1].index(gold)  # the script's map keeps the last
        else:
            cands = rng.sample(labels, SAMPLED)
            while gold in cands:
                cands = rng.sample(labels, SAMPLED)
            cands, label = cands + [gold], SAMPLED
        template = PROMPTS[task]
        examples.append(Example(tuple(cands), tuple((template.format(c), sentence) for c in cands), label, where))
    return tuple(dict.fromkeys(labels)), examples


def _ocnli(dev: list) -> list[Example]:
    names = tuple(OCNLI_PROMPTS)
    examples = []
    for n, row in dev:
        try:
            first, second, gold = row["sentence1"], row["sentence2"], row["label"]
        except KeyError as e:
            raise EvalDataError(f"dev.json line {n}: no field {e}") from None
        if gold == "-":  # no majority label: the script skips the pair
            continue
        if not isinstance(first, str) or not isinstance(second, str):
            raise EvalDataError(f"dev.json line {n}: sentence1 and sentence2 must be text")
        label = names.index(gold) if gold in names[:2] else 2  # the script: anything else is neutral
        examples.append(Example(names, tuple((first + p, second) for p in OCNLI_PROMPTS.values()), label,
                                f"dev.json line {n}"))
    return examples


def _encode(cut: int | None, tokenizer, example: Example) -> list[tuple[list[int], list[int]]]:
    sentence = tokenizer.encode(example.texts[0][1])  # one sentence, every candidate
    sentence = sentence[:cut] if cut is not None else sentence
    return [(tokenizer.encode(context), sentence) for context, _ in example.texts]
