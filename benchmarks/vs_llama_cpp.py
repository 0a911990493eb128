"""cpm-deploy's CPU graphs against llama.cpp's llama-bench at batch 1, on the same weights, in one run.

    python benchmarks/vs_llama_cpp.py --llama-bench /path/to/llama-bench \\
        --gguf f32=small-f32.gguf --gguf q8_0=small-q8_0.gguf --gguf q4_0=small-q4_0.gguf \\
        [--workdir /tmp/cpm-ct2]    # the bundle vs_ctranslate2.py built (the GGUFs hold its weights)

llama.cpp is not a dependency: build its llama-bench yourself (llama-cpp-python's source
distribution vendors llama.cpp) and convert the same checkpoint to GGUF (gpt2 architecture).
Measures, threads equal:
  llama-bench  pp512 (512-token prompt, tokens/s) and tg128 (128 generated tokens, tokens/s);
  ours         prompt tokens/s = 512 / TTFT of a 512-token prompt (prefill + first choice), and
               decode tokens/s = (N - 1) / (T(N) - T(1)) after a 32-token prompt, N = 128.
Pairs: cpu-fp32 vs f32, cpu-int8 vs q8_0, cpu-int4 vs q4_0. Round-robin: each repeat times every
system once (llama-bench with -r 1), and each figure is the median over repeats; this machine's
speed drifts by up to a third over minutes, and a drift must land on both sides of a pair.
Prints the table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from vs_ctranslate2 import ours, timed  # noqa: E402 - one way of timing our graphs for both peers

PAIRS = {"cpu-fp32": "f32", "cpu-int8": "q8_0", "cpu-int4": "q4_0"}


def llama_bench(binary: Path, gguf: Path, threads: int) -> dict:
    out = subprocess.run([str(binary), "-m", str(gguf), "-p", "512", "-n", "128", "-t", str(threads),
                          "-r", "1", "-o", "json"], capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    pp = next(r for r in rows if r["n_prompt"] == 512 and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] == 128 and r["n_prompt"] == 0)
    return {"prompt512_tok_s": pp["avg_ts"], "decode_tok_s": tg["avg_ts"],
            "build": rows[0].get("build_commit"), "cpu": rows[0].get("cpu_info")}


def ours_b1(bundle: Path, graph: str, threads: int, new: int):
    """One repeat of our figures per call, the graph loaded and both shapes warmed up once."""
    run = ours(bundle, graph, threads)
    rng = np.random.default_rng(0)
    short, long = [rng.integers(100, 30000, 32).tolist()], [rng.integers(100, 30000, 512).tolist()]
    run(short, 2), run(long, 1)

    def once() -> dict:
        t1, tn, ttft = timed(run, short, 1), timed(run, short, new), timed(run, long, 1)
        return {"prompt512_tok_s": 512 / ttft, "decode_tok_s": (new - 1) / (tn - t1)}

    return once


def _median(rounds: list[dict]) -> dict:
    return {k: (round(statistics.median(r[k] for r in rounds), 1) if isinstance(rounds[0][k], float) else rounds[0][k])
            for k in rounds[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", type=Path, required=True)
    ap.add_argument("--gguf", action="append", default=[], metavar="TYPE=FILE", help="f32, q8_0 or q4_0 (repeatable)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cpm-ct2"))
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "vs_llama_cpp.json")
    args = ap.parse_args()

    ggufs = dict(g.split("=", 1) for g in args.gguf)
    bundle = args.workdir / f"{args.preset}-bundle"
    pairs = {graph: peer for graph, peer in PAIRS.items() if peer in ggufs}
    mine = {graph: ours_b1(bundle, graph, args.threads, args.new) for graph in pairs}
    rounds = {name: [] for graph, peer in pairs.items() for name in (graph, f"llama.cpp {peer}")}
    for r in range(args.repeats):
        for graph, peer in pairs.items():
            rounds[f"llama.cpp {peer}"].append(llama_bench(args.llama_bench, Path(ggufs[peer]), args.threads))
            rounds[graph].append(mine[graph]())
            print(f"repeat {r + 1}: {graph} {_median(rounds[graph][-1:])} {peer} "
                  f"{_median(rounds[f'llama.cpp {peer}'][-1:])}", flush=True)
    results = {name: _median(values) for name, values in rounds.items()}

    print(f"\n{args.preset}, batch 1, {args.threads} threads")
    print(f"{'system':<16}{'decode tok/s':>14}{'prompt-512 tok/s':>18}{'decode ratio':>14}{'prompt ratio':>14}")
    ratios = {}
    for graph, peer in PAIRS.items():
        if graph not in results:
            continue
        ours_r, theirs = results[graph], results[f"llama.cpp {peer}"]
        ratios[graph] = {k: round(ours_r[k] / theirs[k], 2) for k in ("decode_tok_s", "prompt512_tok_s")}
        print(f"{'llama.cpp ' + peer:<16}{theirs['decode_tok_s']:>14.1f}{theirs['prompt512_tok_s']:>18.1f}")
        print(f"{graph:<16}{ours_r['decode_tok_s']:>14.1f}{ours_r['prompt512_tok_s']:>18.1f}"
              f"{ratios[graph]['decode_tok_s']:>13.2f}x{ratios[graph]['prompt512_tok_s']:>13.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"preset": args.preset, "threads": args.threads, "results": results,
                                    "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
