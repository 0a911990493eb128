"""The runtime core against another commit's, side by side: decode tokens/s at batch 1 and 16, and
the serving engine under 16 simultaneous requests (aggregate tokens/s, time to first token p50).

Both checkouts load the same bundle in child processes that take turns (A B A B ...), so drift
on the machine lands on both. The other commit runs from a git worktree of this repository
through PYTHONPATH; it needs no install of its own.

    python benchmarks/core_vs_commit.py --workdir /tmp/core --baseline 355bc68 [--rounds 3]
Prints a table and writes benchmarks/out/core_vs_commit.json. Random CPM-Small weights unless
--bundle names a bundle (greedy, no early stop: every request decodes its full length).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, queue, statistics, sys, threading, time
bundle, graph, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
from cpm_deploy.runtime import CPMGenerator, SamplingConfig
try:
    from cpm_deploy.runtime.generation.benchmark import measure
except ImportError:  # before runtime/ had subpackages
    from cpm_deploy.runtime.benchmark import measure
try:
    from cpm_deploy.engine import Engine
except ImportError:  # before the engine left serve/
    from cpm_deploy.serve import Engine

gen = CPMGenerator.from_bundle(bundle, variant=graph, threads=threads, verify=False)
lines = open(sys.argv[4], encoding="utf-8").read().splitlines()
prompt = gen.tokenizer.encode(lines[0])[:16]
out = {}
for batch in (1, 16):
    measure(gen, prompt, 8, SamplingConfig(), batch)  # first-run costs out of the way
    out[f"decode_b{batch}"] = measure(gen, prompt, 64, SamplingConfig(), batch)["decode_tokens_per_s"]
del gen
with Engine.from_bundle(bundle, graph=graph, threads=threads, verify=False, max_batch=16) as engine:
    engine.generator.eod_id = -1
    prompts = [engine.tokenizer.encode(t)[:24] for t in lines[1:17]]
    ttft = []

    def client(ids):
        t0 = time.perf_counter()
        events = queue.Queue()
        engine.submit(engine.make_request(ids, 64, sink=events.put))
        first = None
        while (ev := events.get()).kind != "finish":
            first = first or time.perf_counter()
        ttft.append(first - t0)

    for _ in range(2):  # the second burst is measured
        ttft.clear()
        t0 = time.perf_counter()
        workers = [threading.Thread(target=client, args=(p,)) for p in prompts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
    out["serve16_tokens_per_s"] = 16 * 64 / wall
    out["serve16_ttft_p50_ms"] = 1000 * statistics.median(ttft)
print(json.dumps(out))
"""


def run_child(code_root: Path | None, bundle: Path, graph: str, threads: int, corpus: Path) -> dict:
    env = dict(os.environ)
    if code_root is not None:
        env["PYTHONPATH"] = str(code_root) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", CHILD, str(bundle), graph, str(threads), str(corpus)],
                         capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_bundle(workdir: Path) -> Path:
    bundle = workdir / "bundle"
    if not (bundle / "manifest.json").exists():
        ckpt = workdir / "ckpt"
        subprocess.run(["cpm-checkpoint", "random", "small", str(ckpt), "-f", "-q"], check=True)
        subprocess.run(["cpm-export", str(ckpt), str(bundle), "-P", "fp32", "-P", "int8", "--variants-only", "-q", "-f"],
                       check=True)
    return bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--baseline", required=True, help="the commit to compare against")
    ap.add_argument("--bundle", type=Path, help="default: a random CPM-Small exported into --workdir")
    ap.add_argument("--graphs", nargs="+", default=["cpu-fp32", "cpu-int8"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--corpus", type=Path, default=REPO.parent / "shared" / "corpus" / "tnews-headlines.txt")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "core_vs_commit.json")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or make_bundle(args.workdir)
    tree, shim = args.workdir / "baseline-tree", args.workdir / "baseline-shim"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-f", "--detach", str(tree), args.baseline],
                   check=True, capture_output=True)
    shim.mkdir(exist_ok=True)
    if not (shim / "cpm_deploy").exists():
        (shim / "cpm_deploy").symlink_to(tree)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    results = {}
    try:
        for graph in args.graphs:
            runs = {"baseline": [], "this": []}
            for _ in range(args.rounds):
                runs["baseline"].append(run_child(shim, bundle, graph, args.threads, args.corpus))
                runs["this"].append(run_child(None, bundle, graph, args.threads, args.corpus))
            results[graph] = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} | {"runs": v}
                              for k, v in runs.items()}
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)
    metrics = ["decode_b1", "decode_b16", "serve16_tokens_per_s", "serve16_ttft_p50_ms"]
    print(f"medians of {args.rounds} alternating runs; baseline {args.baseline}, this {head} (working tree); "
          "pair ratio: the median of each round's this / baseline, which the machine's drift moves less")
    print(f"{'graph':<10} {'metric':<22} {'baseline':>10} {'this':>10} {'ratio':>7} {'pair ratio':>11} {'spread':>13}")
    for graph, r in results.items():
        for m in metrics:
            a, b = r["baseline"][m], r["this"][m]
            pairs = sorted(x[m] / y[m] for x, y in zip(r["this"]["runs"], r["baseline"]["runs"]))
            r.setdefault("pair_ratio", {})[m] = statistics.median(pairs)
            print(f"{graph:<10} {m:<22} {a:>10.1f} {b:>10.1f} {b / a:>7.2f} {statistics.median(pairs):>11.2f} "
                  f"{pairs[0]:>6.2f}-{pairs[-1]:<6.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"baseline": args.baseline, "this": head, "bundle": str(bundle),
                                    "rounds": args.rounds, "threads": args.threads, "results": results}, indent=2))


if __name__ == "__main__":
    main()
