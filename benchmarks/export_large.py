"""Export of a random CPM-Large checkpoint: wall time and peak RSS of each step.

Runs `cpm-checkpoint random large` and `cpm-export` as child processes (so each peak RSS is its
own), prints a table and writes JSON. Needs ~21 GB of free disk and the vocabulary for the bundle.

    python benchmarks/export_large.py --workdir /tmp/cpm-large --tokenizer ../shared/cpm-vocab/chinese_vocab.model
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run_measured(cmd: list[str]) -> dict:
    """Wall time and peak RSS (GNU time's max resident set) of one child process."""
    t0 = time.perf_counter()
    out = subprocess.run(["/usr/bin/env", "python3", "-c", _WRAP, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.stderr.write(out.stdout + out.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    peak_kb = int(out.stderr.strip().splitlines()[-1].split("=")[1])
    return {"cmd": " ".join(cmd), "wall_s": round(wall, 1), "peak_rss_gb": round(peak_kb / 1024**2, 2),
            "stdout": out.stdout}


# Runs the command as a child and reports its maximum RSS (ru_maxrss of children, in KiB on Linux).
_WRAP = """
import resource, subprocess, sys
rc = subprocess.call(sys.argv[1:], stdout=sys.stdout, stderr=subprocess.DEVNULL)
print('peak_kb=%d' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(rc)
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cpm-large-bench"))
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--preset", default="large")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/out/export_large.json"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and bundle")
    args = ap.parse_args()

    bin_dir = Path(sys.executable).parent
    ckpt, bundle = args.workdir / f"{args.preset}-random", args.workdir / f"{args.preset}-bundle"
    args.workdir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(bundle, ignore_errors=True)
    rows = {
        "random checkpoint": run_measured([str(bin_dir / "cpm-checkpoint"), "random", args.preset, str(ckpt),
                                           "--tokenizer", str(args.tokenizer), "-q"]),
        "cpm-export": run_measured([str(bin_dir / "cpm-export"), str(ckpt), str(bundle), "-q",
                                    "--threads", str(os.cpu_count())]),
    }
    manifest = json.loads((bundle / "manifest.json").read_text())
    graph = manifest["graphs"]["decoder"]
    result = {
        "preset": args.preset, "cpu_count": os.cpu_count(), "steps": {k: {kk: v[kk] for kk in ("wall_s", "peak_rss_gb", "cmd")} for k, v in rows.items()},
        "bundle_bytes": sum(f["bytes"] for f in manifest["files"].values()),
        "files": sorted(manifest["files"]), "nodes": graph["nodes"], "timings_s": manifest["timings_s"],
        "parity": {k: graph["parity"][k] for k in ("logits_max_abs_diff", "presents_max_abs_diff", "top1_agreement")},
    }
    print(f"{'step':<20} {'wall s':>8} {'peak RSS GB':>12}")
    for name, r in rows.items():
        print(f"{name:<20} {r['wall_s']:>8.1f} {r['peak_rss_gb']:>12.2f}")
    print(f"bundle: {result['bundle_bytes'] / 1e9:.2f} GB in {len(result['files'])} files; "
          f"nodes/layer {graph['nodes']['per_layer']}; export stages {manifest['timings_s']}")
    print(f"parity: {result['parity']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(bundle, ignore_errors=True)


if __name__ == "__main__":
    main()
