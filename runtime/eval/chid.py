"""ChID (Chinese idiom cloze), zero-shot, as CPM-1-Finetune's ``preprocess_chid_zeroshot.py`` and
``zero-shot_chid.py`` score it for the model card.

Data: ``test.json``, one JSON object a line with ``candidates`` (idioms) and ``content`` (passages
whose blanks read ``#idiom000123#``), and ``test_answer.json``, one JSON object mapping each blank to
the index of its idiom. Each blank of each passage is one example: per candidate, the passage with
that blank filled and every other blank removed, tokenized whole, ``<eod>`` appended; the score is
the mean cross-entropy of every token after the first (``<eod>`` included); the lowest wins, ties
to the earlier candidate.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .tasks import EvalDataError, Example, Task, read_jsonl

BLANK = re.compile(r"#idiom\d+#")
SPLITS = ("test", "dev")
SOURCE = "TsinghuaAI/CPM-1-Finetune preprocess_chid_zeroshot.py, zero-shot_chid.py, scripts/chid/zero-shot_chid_*.sh"


def load_chid(folder: str | Path, split: str = "test", limit: int | None = None) -> Task:
    folder = Path(folder)
    if split not in SPLITS:
        raise EvalDataError(f"unknown ChID split {split!r}; choose {', '.join(SPLITS)}")
    data, answers_file = folder / f"{split}.json", folder / f"{split}_answer.json"
    for f in (data, answers_file):
        if not f.is_file():
            raise EvalDataError(f"no {f.name} in {folder} (ChID's {split} split: {data.name} and {answers_file.name})")
    try:
        answers = json.loads(answers_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalDataError(f"{answers_file} is not a JSON object of blank -> answer index: {e}") from None
    if not isinstance(answers, dict):
        raise EvalDataError(f"{answers_file} is not a JSON object of blank -> answer index")
    examples = []
    for n, row in read_jsonl(data, "ChID JSON lines"):
        candidates, content = row.get("candidates"), row.get("content")
        if not isinstance(candidates, list) or not candidates or not all(isinstance(c, str) for c in candidates):
            raise EvalDataError(f"{data.name} line {n}: 'candidates' must be a non-empty list of idioms (strings)")
        if not isinstance(content, list) or not all(isinstance(p, str) for p in content):
            raise EvalDataError(f"{data.name} line {n}: 'content' must be a list of passages (strings)")
        for passage in content:
            for blank in BLANK.finditer(passage):
                examples.append(_example(passage, blank, candidates, answers, f"{data.name} line {n}, {blank.group()}"))
    return Task("chid", (), tuple(examples[:limit] if limit else examples), _encode,
                {"source": SOURCE, "split": split, "candidates": "all"}, total=len(examples))


def _example(passage: str, blank: re.Match, candidates: list[str], answers: dict, where: str) -> Example:
    answer = answers.get(blank.group())
    if answer is None:
        raise EvalDataError(f"{where}: the blank has no answer in the answer file")
    if type(answer) is not int or not 0 <= answer < len(candidates):
        raise EvalDataError(f"{where}: answer {answer!r} is not an index into its {len(candidates)} candidates")
    filled = [BLANK.sub("", passage[:blank.start()] + idiom + passage[blank.end():]) for idiom in candidates]
    return Example(tuple(candidates), tuple((text, "") for text in filled), answer, where)


def _encode(tokenizer, example: Example) -> list[tuple[list[int], list[int]]]:
    out = []
    for text, _ in example.texts:
        ids = tokenizer.encode(text) + [tokenizer.eod_id]
        out.append((ids[:1], ids[1:]))
    return out
