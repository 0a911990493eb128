"""The int8 KV cache against the fp32 one: decode step time with 500 positions cached, at batch 1 and
16, on the same graph exported twice (without and with --kv-cache int8), the gate each export
recorded, and the KV memory of one sequence. With --trained, the gate also on a tiny model trained
briefly on headlines with all 1024 positions (random weights say little about real ranges).

    python benchmarks/kv_cache.py --workdir /tmp/kv [--preset large --graphs cpu-int8] [--trained]
Prints a table and writes benchmarks/out/kv_cache[_PRESET].json. Random weights unless --checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def export(ckpt: Path, out: Path, graphs: list[str], kv: str) -> Path:
    if not (out / "manifest.json").exists():
        precisions = [a for g in graphs for a in ("-P", g.split("-")[1])]
        subprocess.run(["cpm-export", str(ckpt), str(out), *precisions, "--variants-only", "--kv-cache", kv, "-q", "-f"],
                       check=True, stdout=subprocess.DEVNULL)
    return out


def step_ms(bundle: Path, graph: str, batch: int, cached: int, steps: int, threads: int | None) -> float:
    from cpm_deploy.runtime import CPMGenerator

    gen = CPMGenerator.from_bundle(bundle, variant=graph, threads=threads, verify=False)
    gen.decoder.settle()  # the weights' move onto huge pages would compete with the steps timed
    rng = np.random.default_rng(0)
    rows = rng.integers(100, 20000, (batch, cached)).tolist()
    with gen.decoder.own_graph_steps():
        _, state = gen.decoder.prefill(rows, cached + steps + 2)
        tokens = rng.integers(100, 20000, batch)
        gen.decoder.step(state, tokens)  # first-run costs
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            gen.decoder.step(state, tokens)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def trained_gate(workdir: Path) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from trained_tiny import train

    from cpm_deploy.runtime.text.tokenizer import DEFAULT_VOCAB

    corpus = REPO.parent / "shared" / "corpus" / "tnews-headlines.txt"
    if not corpus.is_file():
        sys.exit(f"--trained needs the headlines corpus ({corpus})")
    hf = workdir / "trained-1024"
    if not (hf / "config.json").exists():
        train(DEFAULT_VOCAB, corpus.read_text(encoding="utf-8").splitlines(), hf,
              {"n_positions": 1024, "seq": 1024, "batch": 4, "steps": 200, "lines": 2000})
    bundle = export(hf, workdir / "trained-1024-kv8", ["cpu-fp32", "cpu-int8"], "int8")
    graphs = json.loads((bundle / "manifest.json").read_text())["graphs"]
    return {k: g["kv_parity"] for k, g in graphs.items() if "kv_parity" in g}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--checkpoint", type=Path, help="default: a random checkpoint of --preset in --workdir")
    ap.add_argument("--graphs", nargs="+", default=["cpu-fp32", "cpu-int8"])
    ap.add_argument("--cached", type=int, default=500)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--trained", action="store_true", help="also gate a briefly trained 1024-position tiny model")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.checkpoint or args.workdir / f"{args.preset}-ckpt"
    if not (ckpt / "config.json").exists():
        subprocess.run(["cpm-checkpoint", "random", args.preset, str(ckpt), "-q", "-f"], check=True)
    bundles = {kv: export(ckpt, args.workdir / f"{args.preset}-kv-{kv}", args.graphs, kv) for kv in ("fp32", "int8")}
    manifest = json.loads((bundles["int8"] / "manifest.json").read_text())
    cfg = manifest["model"]
    rows = []
    for graph in args.graphs:
        for batch in args.batches:
            ms = {kv: step_ms(b, graph, batch, args.cached, args.steps, args.threads) for kv, b in bundles.items()}
            rows.append({"graph": graph, "batch": batch, "cached": args.cached, "fp32_kv_ms": round(ms["fp32"], 2),
                         "int8_kv_ms": round(ms["int8"], 2), "speedup": round(ms["fp32"] / ms["int8"], 2),
                         "gate": manifest["graphs"][graph]["kv_parity"]})
    per_seq = {kv: cfg["n_layer"] * 2 * cfg["n_embd"] * cfg["n_positions"] * n / 2**20 for kv, n in (("fp32", 4), ("int8", 1))}
    print(f"{args.preset}: KV memory of one {cfg['n_positions']}-position sequence: fp32 {per_seq['fp32']:.0f} MiB, "
          f"int8 {per_seq['int8']:.0f} MiB")
    print(f"{'graph':<10}{'batch':>6}{'fp32 KV ms':>12}{'int8 KV ms':>12}{'speedup':>9}{'gate mean KL':>14}{'top-1':>7}")
    for r in rows:
        print(f"{r['graph']:<10}{r['batch']:>6}{r['fp32_kv_ms']:>12.2f}{r['int8_kv_ms']:>12.2f}{r['speedup']:>9.2f}"
              f"{r['gate']['mean_kl']:>14.2e}{r['gate']['top1_agreement']:>7.0%}")
    trained = trained_gate(args.workdir) if args.trained else None
    if trained:
        for k, g in trained.items():
            print(f"trained tiny (1024 positions) {k}: mean KL {g['mean_kl']:.2e}, max {g['max_kl']:.2e}, "
                  f"top-1 {g['top1_agreement']:.0%}, contexts {g['contexts']}: {'passed' if g['passed'] else 'MISSED'}")
    out = args.out or Path(__file__).parent / "out" / f"kv_cache{'' if args.preset == 'small' else '_' + args.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "kv_mib_per_sequence": per_seq, "rows": rows,
                               "trained_gate": trained}, indent=2) + "\n")


if __name__ == "__main__":
    main()
