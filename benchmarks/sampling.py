"""What choosing the next token costs per row, on CPM's 30000-word vocabulary.

    python benchmarks/sampling.py [--repeats 7] [--rows 64]

The engine draws each running sequence's token on its own (each has its own settings and random
stream), so this cost is paid once per row and step, beside a decode step of a few milliseconds.
Logits are synthetic in three shapes, because the cost of top-p depends on how many tokens the
nucleus holds: "peaked" (standard normal x 12, a trained model's sharpness: a nucleus of tens of
tokens), "flat" (x 3) and "very flat" (x 0.3, what a random-weight model gives: a nucleus of most
of the vocabulary). Each figure is the median over repeats of the mean over ``rows`` rows, in
microseconds. Prints the table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from cpm_deploy.runtime.generation.sampling import SamplingConfig, next_tokens

VOCAB = 30000
SHAPES = {"peaked": 12.0, "flat": 3.0, "very flat": 0.3}
SETTINGS = {
    "greedy": SamplingConfig(),
    "temperature 1": SamplingConfig(do_sample=True),
    "top-p 0.9": SamplingConfig(do_sample=True, top_p=0.9),
    "top-k 40": SamplingConfig(do_sample=True, top_k=40),
    "top-k 40, top-p 0.9": SamplingConfig(do_sample=True, top_k=40, top_p=0.9),
    "top-p 0.9 + penalties": SamplingConfig(do_sample=True, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5),
}


def per_row_us(logits: np.ndarray, cfg: SamplingConfig, counts: np.ndarray | None) -> float:
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for r in range(len(logits)):
        next_tokens(logits[r:r + 1], cfg, rng, counts=None if counts is None else counts[r:r + 1])
    return (time.perf_counter() - t) / len(logits) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "sampling.json")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    base = rng.standard_normal((args.rows, VOCAB)).astype(np.float32)
    counts = rng.poisson(0.01, (args.rows, VOCAB)).astype(np.int32)  # ~300 tokens generated so far
    results: dict[str, dict[str, float]] = {}
    for name, cfg in SETTINGS.items():
        for shape, scale in SHAPES.items():
            logits = base * scale
            runs = [per_row_us(logits, cfg, counts if cfg.counts_tokens else None) for _ in range(args.repeats)]
            results.setdefault(name, {})[shape] = statistics.median(runs)

    print(f"{'us per row':24s}" + "".join(f"{s:>12s}" for s in SHAPES))
    for name, row in results.items():
        print(f"{name:24s}" + "".join(f"{row[s]:12.0f}" for s in SHAPES))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"vocab": VOCAB, "rows": args.rows, "repeats": args.repeats,
                                    "us_per_row": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
