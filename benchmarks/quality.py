"""Quality of every graph variant on held-out text: size, perplexity, top-1 agreement and mean KL
against the fp32 PyTorch reference, teacher-forced through the generation graphs.

Model: a small CPM (4 layers, 256 wide) trained here for a few minutes on the first 7,000 TNEWS
headlines with tests/trained_tiny.py's loop; measured on headlines after those, which it never saw.
Perplexity is taken twice: each headline alone, and in batches of 8 (a graph whose rows influence
each other, as int8's per-call activation scale does, shows it there).

    python benchmarks/quality.py --vocab ../shared/cpm-vocab/chinese_vocab.model --corpus ../shared/corpus/tnews-headlines.txt
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = (("cpu", "fp32"), ("cpu", "int8"), ("cpu", "int4"), ("trt", "fp16"), ("cuda", "fp16"))
TRAIN_LINES = 7000
RECIPE = {"lines": TRAIN_LINES, "steps": 1200, "batch": 16, "seq": 64, "lr": 3e-3, "n_layer": 4, "n_embd": 256,
          "n_head": 8}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cpm-quality"))
    ap.add_argument("--lines", type=int, default=100)
    ap.add_argument("--checkpoint", type=Path, help="a model this script trained before (skips training)")
    ap.add_argument("--int4-block-sizes", type=lambda v: [int(b) for b in v.split(",") if b], default=[64, 128],
                    help="cpu-int4 measured again with these 4-bit block sizes (comma-separated; '' for none)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/out/quality.json"))
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from trained_tiny import train

    from cpm_deploy.exporter import ExportOptions, export_bundle, load_checkpoint

    lines = [x for x in args.corpus.read_text(encoding="utf-8").splitlines() if x.strip()]
    args.workdir.mkdir(parents=True, exist_ok=True)
    for old in args.workdir.glob("bundle*"):  # not the whole workdir: --checkpoint may live there
        shutil.rmtree(old)
    ckpt = args.checkpoint or train(args.vocab, lines[:TRAIN_LINES], args.workdir / "trained", RECIPE)
    held_out = lines[TRAIN_LINES:TRAIN_LINES + args.lines]
    bundle = args.workdir / "bundle"
    export_bundle(ckpt, bundle, ExportOptions(variants=VARIANTS))
    reference = load_checkpoint(ckpt).model
    rows = {f"{t}-{p}": measure(bundle, f"{t}-{p}", reference, held_out) for t, p in VARIANTS}
    for block in args.int4_block_sizes:  # cpu-int4 again, with coarser 4-bit blocks
        other = args.workdir / f"bundle-int4-b{block}"
        export_bundle(ckpt, other, ExportOptions(variants=(("cpu", "int4"),), variants_only=True, int4_block_size=block))
        rows[f"cpu-int4 b{block}"] = measure(other, "cpu-int4", reference, held_out)
    base = rows["cpu-fp32"]["perplexity"]
    print(f"small CPM trained on {TRAIN_LINES} TNEWS headlines; {len(held_out)} held-out headlines, "
          f"{rows['cpu-fp32']['positions']} positions")
    print(f"{'graph':<14} {'MB':>6} {'perplexity':>10} {'vs fp32':>8} {'in batch 8':>10} {'top-1':>7} {'mean KL':>9} "
          f"{'max|Δ|':>7}")
    for name, r in rows.items():
        print(f"{name:<14} {r['bytes'] / 1e6:>6.1f} {r['perplexity']:>10.2f} {r['perplexity'] / base:>7.3f}x "
              f"{r['perplexity_batch8']:>10.2f} {r['top1_agreement']:>7.2%} {r['mean_kl']:>9.1e} "
              f"{r['logits_max_abs_diff']:>7.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2) + "\n")


def measure(bundle: Path, name: str, reference, held_out: list[str]) -> dict:
    """One graph of a bundle against the fp32 PyTorch reference, teacher-forced on ``held_out``."""
    import torch

    from cpm_deploy.runtime import Bundle, CPMGenerator
    from cpm_deploy.runtime.eval.metrics import log_softmax, next_token_logits, perplexity

    manifest = Bundle.open(bundle).manifest
    gen = CPMGenerator.from_bundle(bundle, variant=name, verify=False)
    texts = [gen.tokenizer.encode(t) + [gen.tokenizer.eod_id] for t in held_out]
    agree = total = 0
    kl, worst = [], 0.0
    for ids in texts:
        got = next_token_logits(gen.decoder, ids)
        with torch.no_grad():
            want = reference(torch.tensor([ids]))[0][0, :-1].numpy()
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += len(ids) - 1
        lp, lq = log_softmax(want), log_softmax(got)
        kl.append(np.sum(np.exp(lp) * (lp - lq), -1))
        worst = max(worst, float(np.abs(got - want).max()))
    g = manifest["graphs"][name]
    size = manifest["files"][g["file"]]["bytes"] + manifest["files"][g["data"]]["bytes"]
    if g.get("prefill"):  # cpu-int4 also reads the int8 graph, for prompts
        size += manifest["files"][g["prefill"]["file"]]["bytes"] + manifest["files"][g["prefill"]["data"]]["bytes"]
    return {"bytes": size, "perplexity": perplexity(gen.decoder, texts, batch=1),
            "perplexity_batch8": perplexity(gen.decoder, texts, batch=8), "top1_agreement": agree / total,
            "mean_kl": float(np.mean(np.concatenate(kl))), "logits_max_abs_diff": worst, "positions": total}


if __name__ == "__main__":
    main()
