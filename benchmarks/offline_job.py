"""Offline jobs: `cpm-run -f` through the batching engine against the ways it can be done without it.

For each graph (CPM-Small shape, random weights), the same N headlines x 64 new tokens, greedy,
all in this process after the model is loaded (loading is the same for all):
  one-by-one  - what `cpm-run -f` did before: one CPMGenerator call per prompt (the baseline);
  batched     - the prompts as offline batched CPMGenerator calls, --max-batch prompts a call;
  cpm-run -f  - the job runner `cpm-run -f` uses (engine, records in input order, written to a file);
  batch file  - the same prompts as an OpenAI batch file through the same runner;
  ray         - (--ray) the cpm-run -f job on a two-node Ray cluster started on this machine, one
                worker per node (both nodes share its cores: a correctness run, not a speed-up).
batched, cpm-run -f and batch file run --rounds times, alternating; the best of each is reported.
Reported: generated tokens/s and the ratios the goals name (cpm-run -f against batched and
against one-by-one; the batch file against cpm-run -f).

    python benchmarks/offline_job.py [--prompts 256] [--graphs cpu-int8 cpu-fp32] [--bundle DIR]
Prints a table and writes benchmarks/out/offline_job.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
NEW_TOKENS = 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="a bundle with the graphs (default: the eval_speed.py random CPM-Small)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cpm-eval-speed"))
    ap.add_argument("--graphs", nargs="+", default=["cpu-int8", "cpu-fp32"])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-one-by-one", action="store_true", help="the baseline takes minutes")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ray", action="store_true", help="add the two-node Ray row (needs the [ray] extra)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "offline_job.json")
    args = ap.parse_args()

    from cpm_deploy.runtime import CPMGenerator

    bundle = args.bundle or _bundle(args.workdir)
    lines = (SHARED / "corpus" / "tnews-headlines.txt").read_text(encoding="utf-8").splitlines()
    prompts = [x for x in lines if x.strip()][:args.prompts]
    rows = {}
    for graph in args.graphs:
        gen = CPMGenerator.from_bundle(bundle, threads=args.threads, verify=False, variant=graph)
        gen(prompts[:2], max_new_tokens=4)  # warm-up
        row = {}
        if not args.skip_one_by_one:
            row["one-by-one"] = _timed(lambda: [gen.generate_ids([p], max_new_tokens=NEW_TOKENS) for p in prompts])
        systems = {
            "batched": lambda: _timed(lambda: [gen.generate_ids(prompts[i:i + args.max_batch], max_new_tokens=NEW_TOKENS)
                                               for i in range(0, len(prompts), args.max_batch)]),
            "cpm-run -f": lambda: _job(gen, prompts, "text", args.max_batch),
            "batch file": lambda: _job(gen, prompts, "openai-batch", args.max_batch),
        }
        for _ in range(args.rounds):
            for name, fn in systems.items():
                r = fn()
                if name not in row or r["tokens_per_s"] > row[name]["tokens_per_s"]:
                    row[name] = r
        gen = systems = None  # its sessions go before the Ray workers load theirs
        if args.ray:
            row["ray"] = _ray(bundle, graph, prompts, args.max_batch)
        rows[graph] = row
        print(graph, {k: round(v["tokens_per_s"], 1) for k, v in row.items()}, flush=True)
    print(f"\n{len(prompts)} headlines x {NEW_TOKENS} new tokens, greedy, {args.threads} threads, random weights")
    print(f"{'graph':<10}{'system':<12}{'tok/s':>9}{'vs batched':>12}{'vs one-by-one':>15}")
    for graph, row in rows.items():
        for name, r in row.items():
            vs_b = r["tokens_per_s"] / row["batched"]["tokens_per_s"]
            vs_1 = r["tokens_per_s"] / row["one-by-one"]["tokens_per_s"] if "one-by-one" in row else float("nan")
            print(f"{graph:<10}{name:<12}{r['tokens_per_s']:>9.1f}{vs_b:>11.2f}x{vs_1:>14.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"prompts": len(prompts), "new_tokens": NEW_TOKENS, "max_batch": args.max_batch,
                                    "threads": args.threads, "graphs": rows}, indent=2) + "\n")


def _timed(fn) -> dict:
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    tokens = sum(len(ids) for chunk in out for ids in chunk)
    return {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": tokens / seconds}


def _job(gen, prompts: list[str], fmt: str, max_batch: int) -> dict:
    from cpm_deploy.jobs.offline import EngineJob, Output, offline_engine, run_job
    from cpm_deploy.jobs.offline_formats import parse

    if fmt == "text":
        raw = prompts
        defaults = {"max_new_tokens": NEW_TOKENS}
    else:
        raw = [json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/completions",
                           "body": {"prompt": p, "max_tokens": NEW_TOKENS, "temperature": 0}}, ensure_ascii=False)
               for i, p in enumerate(prompts)]
        defaults = {}
    with tempfile.TemporaryDirectory() as tmp, offline_engine(gen, max_batch) as engine:
        out = Output(Path(tmp) / "out.jsonl")
        t0 = time.perf_counter()
        run_job(EngineJob(engine, "bench").run(parse(n, t, fmt, defaults) for n, t in enumerate(raw, 1)), out)
        seconds = time.perf_counter() - t0
        out.close()
        tokens = int(engine.metrics.registry.get_sample_value("cpm_generated_tokens_total"))
    return {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": tokens / seconds}


def _ray(bundle: Path, graph: str, prompts: list[str], max_batch: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from ray_helpers import two_node_cluster  # the cluster the Ray tests use: two nodes on loopback

    import ray

    from cpm_deploy.jobs import ray_job
    from cpm_deploy.jobs.offline_formats import parse

    with two_node_cluster():
        pool = [ray_job.GenerationWorker.options(num_cpus=1).remote(str(bundle), graph, 1, max_batch, False, "b")
                for _ in range(2)]
        ray.get([w.pid.remote() for w in pool])  # models loaded
        lines = [parse(n, p, "text", {"max_new_tokens": NEW_TOKENS}) for n, p in enumerate(prompts, 1)]
        t0 = time.perf_counter()
        records = [r for part in ray_job.ordered(pool, ray_job.chunked(lines, 16), lambda w, c: w.run.remote(c))
                   for r in part]
        seconds = time.perf_counter() - t0
        tokens = sum(ray.get([w.generated_tokens.remote() for w in pool]))
        assert len(records) == len(prompts)
    return {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": tokens / seconds}


def _bundle(workdir: Path) -> Path:
    bundle = workdir / "small-bundle"
    if not bundle.exists():
        raise SystemExit(f"no bundle at {bundle}: run benchmarks/eval_speed.py once, or pass --bundle")
    return bundle


if __name__ == "__main__":
    main()
