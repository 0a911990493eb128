"""TNEWS zero-shot accuracy of every graph variant of one bundle, with agreement with fp32 and examples/s.

Model: the tiny CPM the tests train briefly on TNEWS headlines (tests/trained_tiny.py), exported
with every variant. Tiny, briefly trained weights say nothing about the model card's numbers (CPM
Small 0.626, Large 0.703): this checks that the variants agree with fp32 and how fast scoring is.

    python benchmarks/eval_variants.py --limit 1000 [--bundle DIR]
Prints a table and writes benchmarks/out/eval_variants.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
VARIANTS = (("cpu", "fp32"), ("cpu", "int8"), ("cpu", "int4"), ("trt", "fp16"), ("cuda", "fp16"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="an existing bundle (default: train the tiny model and export it)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cpm-eval-variants"))
    ap.add_argument("--data", type=Path, default=SHARED / "corpus", help="folder with TNEWS dev and labels")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "eval_variants.json")
    args = ap.parse_args()

    from cpm_deploy.runtime.eval import classify, encode_examples, load_task, open_scorer, summarize

    bundle = args.bundle or _trained_bundle(args.workdir)
    task = load_task("tnews", args.data, args.limit)
    rows, first, encoded = {}, None, None
    for target, precision in VARIANTS:
        name = f"{target}-{precision}"
        scorer = open_scorer(bundle, name, threads=args.threads, verify=False)
        encoded = encoded or encode_examples(task, scorer.tokenizer, scorer.n_positions)
        t0 = time.perf_counter()
        out = classify(scorer, encoded)
        seconds = time.perf_counter() - t0
        first = first or out["predictions"]
        rows[name] = {"accuracy": summarize(task, out["predictions"])["accuracy"],
                      "agreement_with_fp32": sum(a == b for a, b in zip(out["predictions"], first)) / len(first),
                      "examples_per_s": len(task.examples) / seconds}
        print(name, rows[name], flush=True)
    print(f"\nTNEWS dev, {len(task.examples)} examples, tiny trained model (not the model card's weights)")
    print(f"{'graph':<10}{'accuracy':>10}{'agrees with fp32':>18}{'examples/s':>12}")
    for name, r in rows.items():
        print(f"{name:<10}{r['accuracy']:>10.4f}{r['agreement_with_fp32']:>18.1%}{r['examples_per_s']:>12.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"examples": len(task.examples), "graphs": rows}, indent=2) + "\n")


def _trained_bundle(workdir: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from trained_tiny import train

    from cpm_deploy.exporter import ExportOptions, export_bundle
    from cpm_deploy.runtime.text.tokenizer import DEFAULT_VOCAB

    bundle = workdir / "bundle"
    if not bundle.exists():
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        lines = [x for x in (SHARED / "corpus" / "tnews-headlines.txt").read_text(encoding="utf-8").splitlines() if x]
        ckpt = train(DEFAULT_VOCAB, lines[:4000], workdir / "trained")
        export_bundle(ckpt, bundle, ExportOptions(variants=VARIANTS))
    else:  # exported by whatever code ran before: say so, a stale bundle measures old graphs
        print(f"reusing {bundle}; delete it to export with this code", flush=True)
    return bundle


if __name__ == "__main__":
    main()
