"""cpm-eval's scoring speed against the same graph's prompt speed, side by side in one run.

For each CPU graph: candidate tokens/s of one-pass scoring (the graph's scoring twin) on TNEWS
candidates as cpm-eval builds them; the same graph's prompt throughput (one 128-token prompt
prefilled, last-position logits only, as generation runs it: cpu-int4 on its int8 prompt graph, and
on its own 4-bit graph in a second column); step-by-step scoring for reference. Random weights:
speed only, no accuracy.

    python benchmarks/eval_speed.py [--preset small] [--limit 64] [--threads 2] [--bundle DIR]
Prints a table and writes benchmarks/out/eval_speed.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GRAPHS = ("cpu-fp32", "cpu-int8", "cpu-int4")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--bundle", type=Path, help="an existing bundle with cpu-fp32/int8/int4 (default: export a random one)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cpm-eval-speed"))
    ap.add_argument("--data", type=Path, default=SHARED / "corpus", help="folder with TNEWS dev and labels")
    ap.add_argument("--graphs", nargs="+", default=list(GRAPHS))
    ap.add_argument("--limit", type=int, default=64, help="TNEWS examples (4 candidates each)")
    ap.add_argument("--step-limit", type=int, default=8, help="examples for the step-by-step reference (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens-per-pass", type=int, help="padded positions per scoring pass (default: the runtime's)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "eval_speed.json")
    args = ap.parse_args()

    from cpm_deploy.runtime import CPMGenerator
    from cpm_deploy.runtime.eval import classify, encode_examples, load_task, open_scorer, scoring

    if args.tokens_per_pass:
        scoring.TOKENS_PER_PASS = args.tokens_per_pass

    bundle = args.bundle or _random_bundle(args.workdir, args.preset)
    task = load_task("tnews", _tnews_folder(args.data, args.workdir), args.limit)
    rows = {}
    for graph in args.graphs:
        scorer = open_scorer(bundle, graph, "one-pass", threads=args.threads, verify=False)
        encoded = encode_examples(task, scorer.tokenizer, scorer.n_positions)
        positions = sum(len(p) + len(s) - 1 for ex in encoded for p, s in ex)
        classify(scorer, encoded[:4])  # warm-up
        score_s = _best(lambda: classify(scorer, encoded), args.repeats)
        del scorer
        gen = CPMGenerator.from_bundle(bundle, threads=args.threads, verify=False, variant=graph)
        row = {"score_tokens_per_s": positions / score_s, "prompt_tokens_per_s": _prompt_speed(gen.decoder, args.repeats)}
        row["ratio"] = row["score_tokens_per_s"] / row["prompt_tokens_per_s"]
        if gen.decoder.prefill_session is not gen.decoder.session:  # cpu-int4: its own graph's prompts too
            gen.decoder.prefill_session = gen.decoder.session
            row["own_graph_prompt_tokens_per_s"] = _prompt_speed(gen.decoder, args.repeats)
            row["own_graph_ratio"] = row["score_tokens_per_s"] / row["own_graph_prompt_tokens_per_s"]
        del gen
        row["examples_per_s"] = len(encoded) / score_s
        if args.step_limit:
            steps = open_scorer(bundle, graph, "steps", threads=args.threads, verify=False)
            sub = encoded[:args.step_limit]
            row["steps_examples_per_s"] = len(sub) / _best(lambda: classify(steps, sub), 1)
            del steps
        rows[graph] = row
        print(graph, {k: round(v, 3) for k, v in row.items()}, flush=True)
    print(f"\n{bundle.name}, TNEWS x {args.limit} (4 candidates each), {args.threads} threads, "
          f"{scoring.TOKENS_PER_PASS} positions a pass, random weights")
    print(f"{'graph':<10}{'score tok/s':>13}{'prompt tok/s':>14}{'ratio':>8}{'own graph':>11}{'ratio':>8}"
          f"{'examples/s':>12}{'steps ex/s':>12}")
    nan = float("nan")
    for g, r in rows.items():
        print(f"{g:<10}{r['score_tokens_per_s']:>13.0f}{r['prompt_tokens_per_s']:>14.0f}{r['ratio']:>8.2f}"
              f"{r.get('own_graph_prompt_tokens_per_s', nan):>11.0f}{r.get('own_graph_ratio', nan):>8.2f}"
              f"{r['examples_per_s']:>12.1f}{r.get('steps_examples_per_s', nan):>12.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bundle": str(bundle), "examples": args.limit, "threads": args.threads,
                                    "tokens_per_pass": scoring.TOKENS_PER_PASS, "graphs": rows}, indent=2) + "\n")


def _prompt_speed(decoder, repeats: int) -> float:
    prompt = [np.random.default_rng(0).integers(10, 30000, 128).tolist()]
    decoder.prefill(prompt, 128)  # warm-up
    return 128 / _best(lambda: decoder.prefill(prompt, 128), repeats)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _tnews_folder(data: Path, workdir: Path) -> Path:
    """CLUE's layout (dev.json, labels.json) over ../shared/corpus's file names."""
    folder = workdir / "tnews"
    folder.mkdir(parents=True, exist_ok=True)
    for src, dst in (("tnews-dev.jsonl", "dev.json"), ("tnews-labels.jsonl", "labels.json")):
        if not (folder / dst).exists():
            (folder / dst).write_bytes((data / src).read_bytes())
    return folder


def _random_bundle(workdir: Path, preset: str) -> Path:
    from cpm_deploy.exporter import ExportOptions, export_bundle
    from cpm_deploy.exporter.checkpoint_tools import write_random_checkpoint
    from cpm_deploy.exporter.config import CPMConfig
    from cpm_deploy.runtime.text.tokenizer import DEFAULT_VOCAB

    ckpt, bundle = workdir / f"{preset}-random", workdir / f"{preset}-bundle"
    if not bundle.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        if not ckpt.exists():
            write_random_checkpoint(CPMConfig.from_preset(preset), ckpt, seed=0, tokenizer=DEFAULT_VOCAB)
        export_bundle(ckpt, bundle, ExportOptions(variants=tuple(("cpu", p) for p in ("fp32", "int8", "int4")),
                                                  variants_only=True))
    else:  # exported by whatever code ran before: say so, a stale bundle measures old graphs
        print(f"reusing {bundle}; delete it to export with this code", flush=True)
    return bundle


if __name__ == "__main__":
    main()
