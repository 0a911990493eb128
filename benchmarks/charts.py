"""The README's comparisons as pictures, drawn from the measurement JSON under benchmarks/results/
(each file says which run and script produced it) into docs/img/. Never drawn by hand: rerun
this after a new measurement.

    python benchmarks/charts.py [--results benchmarks/results] [--out docs/img]
Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).parent
OURS, PEER = "#2e5bff", "#98a2b3"


def load(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text(encoding="utf-8"))


def bars(ax, labels, ours, peer, ours_name, peer_name, unit, log=False):
    import numpy as np

    x = np.arange(len(labels))
    ax.bar(x - 0.2, ours, 0.4, color=OURS, label=ours_name)
    ax.bar(x + 0.2, peer, 0.4, color=PEER, label=peer_name)
    for i, (a, b) in enumerate(zip(ours, peer)):
        ax.annotate(f"{a / b:.1f}x" if unit == "tok/s" else f"{b / a:.1f}x", (i, max(a, b)), ha="center",
                    va="bottom", fontsize=9)
    ax.set_xticks(x, labels, fontsize=9)
    ax.set_ylabel(unit)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(top=ax.get_ylim()[1] * 6)  # room above the bars for the labels and the legend
    else:
        ax.set_ylim(top=ax.get_ylim()[1] * 1.3)
    ax.legend(frameon=False, fontsize=8, loc="upper left")


def serving_large(results: Path, out: Path) -> Path:
    import matplotlib.pyplot as plt

    data = load(results, "serving_large.json")
    rows = data["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    labels = [f"{r['clients']} clients" for r in rows]
    bars(a, labels, [r["cpm_serve_tok_s"] for r in rows], [r["llama_server_tok_s"] for r in rows],
         "cpm-serve cpu-int8", "llama-server q8_0", "tok/s")
    a.set_title("throughput (higher is better)", fontsize=10)
    bars(b, labels, [r["cpm_serve_ttft_s"] for r in rows], [r["llama_server_ttft_s"] for r in rows],
         "cpm-serve cpu-int8", "llama-server q8_0", "s")
    b.set_title("TTFT p50 (lower is better; label: ours faster by)", fontsize=10)
    fig.suptitle(data["title"], fontsize=11)
    return save(fig, out / "serving_large.png")


def long_prompts(results: Path, out: Path) -> Path:
    import matplotlib.pyplot as plt

    data = load(results, "long_prompts_large.json")
    ours = next(r for r in data["rows"] if r["system"] == data["ours"])
    peer = next(r for r in data["rows"] if r["system"].startswith("llama-server"))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    keys = [("burst1_ttft_p50_s", "few-shot\nburst 1"), ("burst2_ttft_p50_s", "burst 2\n(template cached)"),
            ("long_ttft_p50_s", "900-token prompt\nmid-stream")]
    bars(a, [k[1] for k in keys], [ours[k] for k, _ in keys], [peer[k] for k, _ in keys], ours["system"],
         peer["system"], "s", log=True)
    a.set_title("time to first token, p50 (label: ours faster by)", fontsize=10)
    bars(b, ["ITL p99", "ITL max"], [ours["itl_p99_ms"], ours["itl_max_ms"]], [peer["itl_p99_ms"], peer["itl_max_ms"]],
         ours["system"], peer["system"], "ms", log=True)
    b.set_title("running streams while long prompts arrive", fontsize=10)
    fig.suptitle(data["title"], fontsize=11)
    return save(fig, out / "long_prompts_large.png")


def peers_small(results: Path, out: Path) -> Path:
    import matplotlib.pyplot as plt

    data = load(results, "peers_small.json")
    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    labels = [f"{r['what']}\nvs {r['peer']}" for r in rows]
    ratios = [r["ours"] / r["peer_value"] for r in rows]
    ax.barh(range(len(rows)), ratios, color=[OURS if x >= 1 else "#f04438" for x in ratios])
    ax.axvline(1, color="#1d2330", lw=0.8)
    for i, x in enumerate(ratios):
        ax.annotate(f"{x:.2f}x", (x, i), va="center", ha="left", fontsize=9, xytext=(3, 0), textcoords="offset points")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("cpm-deploy / peer, tokens/s (right of 1: we are faster)")
    fig.suptitle(data["title"], fontsize=11)
    return save(fig, out / "peers_small.png")


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--out", type=Path, default=HERE.parent / "docs" / "img")
    args = ap.parse_args()
    for draw in (peers_small, serving_large, long_prompts):
        print("wrote", draw(args.results, args.out))


if __name__ == "__main__":
    main()
