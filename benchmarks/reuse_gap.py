"""What prefix reuse and chunked prefill change in the numbers, on graphs that cannot be exact:
for many prompts (a shared template + a headline), the last position's next-token distribution
from one whole-prompt call against the same prompt continued after its cached template (as the
engine runs a reused prefix or a chunk). Mean KL and top-1 agreement per graph; fp32 as the
control.

    python benchmarks/reuse_gap.py --bundle BUNDLE [--graphs cpu-fp32 cpu-int8] [--prompts 200]
Prints a table and writes benchmarks/out/reuse_gap.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from long_prompts import Prompts  # noqa: E402


def gap(bundle: Path, graph: str, prompts: list[list[int]], split: int) -> dict:
    from cpm_deploy.exporter.verify import mean_kl
    from cpm_deploy.runtime import CPMGenerator

    dec = CPMGenerator.from_bundle(bundle, variant=graph, verify=False).decoder
    whole, continued = [], []
    for i in range(0, len(prompts), 8):
        rows = prompts[i:i + 8]
        a, b = dec.kv_pool(len(rows), 1024), dec.kv_pool(len(rows), 1024)
        whole.append(dec.run_prefill(rows, a.views(0, len(rows))))
        dec.run_prefill([r[:split] for r in rows], b.views(0, len(rows)))
        continued.append(dec.run_prefill([r[split:] for r in rows], b.views(0, len(rows)),
                                         cached=np.full(len(rows), split)))
    w, c = np.concatenate(whole), np.concatenate(continued)
    return {"graph": graph, "prompts": len(prompts), "mean_kl": mean_kl(w, c),
            "max_kl": max(mean_kl(w[i:i + 1], c[i:i + 1]) for i in range(len(w))),
            "top1_agreement": float((w.argmax(-1) == c.argmax(-1)).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--graphs", nargs="+", default=["cpu-fp32", "cpu-int8"])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--template", type=int, default=600, help="template tokens, the cached part")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "reuse_gap.json")
    args = ap.parse_args()
    p = Prompts()
    template = p.template(args.template, 0)
    prompts = [template + h for h in p.headlines(args.prompts, 100)]
    rows = [gap(args.bundle, g, prompts, args.template) for g in args.graphs]
    print(f"\n{'graph':<12}{'prompts':>8}{'mean KL':>12}{'max KL':>12}{'top-1 agree':>13}")
    for r in rows:
        print(f"{r['graph']:<12}{r['prompts']:>8}{r['mean_kl']:>12.2e}{r['max_kl']:>12.2e}{r['top1_agreement']:>13.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bundle": str(args.bundle), "template": args.template, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
