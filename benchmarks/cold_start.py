"""Cold start to the 16th token, and what a bundle weighs, for CPM-Large int4.

Steps (each skipped when its output exists in --workdir):
  1. a random CPM-Large checkpoint (cpm-checkpoint random large);
  2. `full`: cpm-export -P int4 -P int8 (standard graphs kept: the default);
  3. `slim`: cpm-export -P int4 --variants-only --no-int4-prefill (int4 alone: prompts on the 4-bit graph).
Then `cpm-run BUNDLE 清华大学 -n 16 -g cpu-int4` is timed as a new process, with the page cache
dropped before the run when this user may (root on Linux; the files then come from disk) and
without (warm: from memory), in three states:
  baseline   - an older cpm-deploy (--baseline-src, a checkout) that hashed every bundle file;
  first run  - this version, no verification record yet (hashes the int4 graph's files only);
  later runs - this version, record present (hashes nothing unchanged).
Prints a table and writes benchmarks/out/cold_start.json.

    python benchmarks/cold_start.py --workdir /data/cold --baseline-src /tmp/cpm-old
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
RUN = ["清华大学", "-n", "16", "-g", "cpu-int4"]


def sh(*cmd: str, env=None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def size_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e9


def timed_run(bundle: Path, env: dict, cold: bool = True) -> tuple[float, bool]:
    cold = drop_page_cache() if cold else False
    return sh(str(BIN / "cpm-run"), str(bundle), *RUN, env=env), cold


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--preset", default="large")
    ap.add_argument("--baseline-src", type=Path, help="checkout of an older cpm-deploy to time as the baseline")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "cold_start.json")
    args = ap.parse_args()
    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    ckpt, full, slim = w / "ckpt", w / "full", w / "slim"
    timings = {}
    if not ckpt.exists():
        timings["checkpoint_s"] = sh(str(BIN / "cpm-checkpoint"), "random", args.preset, str(ckpt), "-q")
    if not full.exists():
        timings["export_full_s"] = sh(str(BIN / "cpm-export"), str(ckpt), str(full), "-P", "int4", "-P", "int8", "-q")
    if not slim.exists():
        timings["export_slim_s"] = sh(str(BIN / "cpm-export"), str(ckpt), str(slim), "-P", "int4", "--variants-only",
                                      "--no-int4-prefill", "-q")

    rows = []
    cache = Path(tempfile.mkdtemp(prefix="cpm-cold-cache-"))
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    if args.baseline_src:
        shim = Path(tempfile.mkdtemp(prefix="cpm-baseline-"))
        (shim / "cpm_deploy").symlink_to(args.baseline_src.resolve())
        base_env = dict(env, PYTHONPATH=str(shim))
        code = "from cpm_deploy.cli.run import main; main()"
        for warm in [False] * args.repeats + [True] * args.repeats:
            cold = False if warm else drop_page_cache()
            t = sh(sys.executable, "-c", code, str(full), *RUN, env=base_env)
            rows.append({"state": "baseline (hashes every file)", "bundle": "full", "seconds": t, "page_cache_dropped": cold})
    for bundle_name, bundle in (("full", full), ("slim", slim)):
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir()
        t, cold = timed_run(bundle, env)
        rows.append({"state": "first run (graph's files hashed)", "bundle": bundle_name, "seconds": t, "page_cache_dropped": cold})
        for warm in [False] * args.repeats + [True] * args.repeats:
            t, cold = timed_run(bundle, env, cold=not warm)
            rows.append({"state": "later run (record, no hashing)", "bundle": bundle_name, "seconds": t,
                         "page_cache_dropped": cold})
    sizes = {"full_gb": round(size_gb(full), 2), "slim_gb": round(size_gb(slim), 2)}
    print(f"bundle sizes: full (-P int4 -P int8) {sizes['full_gb']} GB, "
          f"slim (-P int4 --variants-only --no-int4-prefill) {sizes['slim_gb']} GB")
    print(f"{'state':<36}{'bundle':<8}{'cpm-run, 16 tokens':>20}{'cold cache':>12}")
    for r in rows:
        print(f"{r['state']:<36}{r['bundle']:<8}{r['seconds']:>18.1f} s{str(r['page_cache_dropped']):>12}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"preset": args.preset, "sizes": sizes, "timings": timings, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
