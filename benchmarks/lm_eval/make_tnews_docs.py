"""Write tnews_cpm.jsonl for tnews_cpm.yaml: CLUE's TNEWS dev set with the candidates cpm-eval
draws (the model card's setting), one line per example: {"choices": [the four contexts],
"sentence": the headline, "label": the gold candidate's index}.

    python make_tnews_docs.py --data ./tnews_public [--limit N] [--out tnews_cpm.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cpm_deploy.runtime.eval import load_task


def write_docs(data: Path, out: Path, limit: int | None = None) -> int:
    task = load_task("tnews", data, limit=limit)
    with open(out, "w", encoding="utf-8") as f:
        for ex in task.examples:
            doc = {"choices": [context for context, _ in ex.texts], "sentence": ex.texts[0][1], "label": ex.label}
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    return len(task.examples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="CLUE's TNEWS folder (dev.json, labels.json)")
    ap.add_argument("--limit", type=int, help="the first N examples (their candidates are the full run's)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("tnews_cpm.jsonl"))
    args = ap.parse_args()
    print(f"wrote {write_docs(args.data, args.out, args.limit)} examples to {args.out}")


if __name__ == "__main__":
    main()
