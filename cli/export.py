"""cpm-export: checkpoint -> verified deployment bundle."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .common import setup_logging, stage_progress, user_errors

STAGES = {"load": "loading checkpoint", "reference": "torch reference", "export": "writing ONNX (layers)",
          "verify decoder": "verifying decoder", "verify decoder_last": "verifying decoder_last"}


def parity_table(report: dict) -> Table:
    table = Table(title=f"parity vs PyTorch (atol {report['atol']}, rtol {report['rtol']})")
    for col in ("case", "logits max|Δ|", "presents max|Δ|", "top-1", "ok"):
        table.add_column(col)
    for c in report["cases"]:
        table.add_row(c["case"], f"{c.get('logits_max_abs_diff', float('nan')):.2e}",
                      f"{c.get('presents_max_abs_diff', float('nan')):.2e}",
                      f"{c.get('top1_agreement', 0):.1%}", "yes" if c["passed"] else "[red]NO[/red]")
    return table


def variants_table(manifest: dict) -> Table:
    table = Table(title="graphs verified against PyTorch (* = default for cpm-run; int8 KV: KL against its "
                        "fp32 cache)")
    any_held = any("held_back" in g for g in manifest["graphs"].values())
    for col in ("graph", "kv cache", "MB", "logits max|Δ|", "top-1", "mean KL", "gate") + ("held back",) * any_held:
        table.add_column(col)
    files = manifest["files"]
    for name, g in manifest["graphs"].items():
        p = g["parity"]
        mb = (files[g["file"]]["bytes"] + files.get(g["data"], {"bytes": 0})["bytes"]) / 1e6
        gate = g.get("gate", {"atol": p["atol"]})
        gate = f"KL≤{gate['max_mean_kl']:g}" if "max_mean_kl" in gate else f"|Δ|≤{gate['atol']:g}"
        default = "*" if name == manifest.get("default_graph") else ""
        default += f" (4-bit blocks of {g['block_size']})" if g.get("block_size", 32) != 32 else ""
        held = g.get("held_back")
        held = (f"{len(held['kept'])} MatMul(s): {', '.join(sorted(set(held['kept'].values())))}; "
                f"plain KL {held['plain_mean_kl']:.1e}, step {held['plain_step_ms']:.2f} → {held['step_ms']:.2f} ms"
                if held else "")
        kv = g.get("kv_cache", "concat")
        if g.get("kv_dtype") == "int8":
            kv += f" int8 ({g['kv_parity']['mean_kl']:.0e})"  # its KL against the fp32 cache
        table.add_row(name + default, kv, f"{mb:,.1f}", f"{p['logits_max_abs_diff']:.2e}",
                      f"{p['top1_agreement']:.1%}", f"{p['mean_kl']:.1e}", gate, *(held,) * any_held)
    return table


def standard_graph(manifest: dict) -> dict:
    """The verified standard decoder, shipped or (--variants-only) left out."""
    return manifest["graphs"].get("decoder") or manifest["left_out"]["decoder"]


def summary_table(out: Path, manifest: dict) -> Table:
    cfg, graph = manifest["model"], standard_graph(manifest)
    size = sum(f["bytes"] for f in manifest["files"].values())
    table = Table(title=f"bundle {out}", show_header=False)
    left_out = manifest.get("left_out") or {}
    rows = [
        ("model", f"{cfg['n_layer']} layers, {cfg['n_embd']} wide, {cfg['n_head']} heads, vocab {cfg['vocab_size']}"),
        ("source", f"{manifest['source']['format']}"),
        ("standard graph", f"{graph['file']} (opset {graph['opset']}, fp32), {graph['nodes']['per_layer']} nodes/layer, "
                           f"{graph['nodes']['total']} in all" + (" - verified, left out (--variants-only)" if left_out else "")),
        ("holds", ", ".join(manifest["graphs"]) + f"; tokenizer {manifest['tokenizer']['file']}; config.json"),
        ("size", f"{size / 1e6:,.1f} MB in {len(manifest['files'])} files"),
        ("time", ", ".join(f"{k} {v:.1f}s" for k, v in manifest["timings_s"].items())),
    ]
    for k, v in rows:
        table.add_row(k, v)
    return table


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("-t", "--tokenizer", type=click.Path(path_type=Path, dir_okay=False),
              help="sentencepiece model to ship (default: spiece.model / chinese_vocab.model beside SRC, "
                   "else CPM's vocabulary shipped with cpm-deploy).")
@click.option("--opset", type=click.IntRange(17, 21), default=17, show_default=True,
              help="ONNX opset; 20+ uses the native Gelu op, 17 keeps TensorRT 8.6 able to parse the graph.")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Absolute tolerance of the parity check.")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="Relative tolerance of the parity check.")
@click.option("-T", "--target", type=click.Choice(["cpu", "cuda", "trt"]), default="cpu", show_default=True,
              help="Where the bundle runs: cpu/cuda get onnxruntime-fused graphs, trt standard-op graphs.")
@click.option("-P", "--precision", "precisions", multiple=True, type=click.Choice(["fp32", "fp16", "int8", "int4"]),
              help="Graph variants to build (repeatable; the first is the default graph). "
                   "cpu: fp32 int8 int4; cuda: fp32 fp16; trt: fp32 fp16. Default: fp32.")
@click.option("--variants-only", is_flag=True,
              help="Ship only the -P variants: the standard graphs (decoder.onnx, the Hugging Face contract and "
                   "TensorRT's source) are built and verified, then left out with their fp32 data unless a variant "
                   "reads it. An int4 CPM-Large bundle shrinks from 15 GB to about 2 GB (with --no-int4-prefill).")
@click.option("--max-kl", type=click.FloatRange(min=0, min_open=True),
              help="Gate for fp16/int8/int4 variants: the largest mean KL divergence from the fp32 reference "
                   "accepted (defaults: fp16 1e-3, int8 1e-2, int4 0.1).")
@click.option("--no-fallback", is_flag=True,
              help="An int8/int4 variant that misses its gate fails the export, instead of holding back the "
                   "MatMuls that cost the accuracy (fp32 activations, int8 weights or fp32, as few as needed).")
@click.option("--no-int4-prefill", is_flag=True,
              help="cpu-int4 runs prompts on its own 4-bit graph. By default it runs them on the int8 graph "
                   "(built for it when -P int8 is not given), which on CPUs with VNNI/AMX processes prompts "
                   "several times faster; this flag keeps an int4-only bundle at its smallest.")
@click.option("--int4-block-size", type=click.Choice(["32", "64", "128"]), default="32", show_default=True,
              help="Weights per fp32 scale in cpu-int4's 4-bit MatMuls. Larger blocks store fewer scales, so a "
                   "batch-1 decode step reads fewer bytes and runs faster, for coarser weights (benchmarks/README.md "
                   "has the numbers). The gate still holds.")
@click.option("--kv-cache", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="int8: the CPU graphs keep their KV cache as int8 with per-channel scales calibrated on the "
                   "reference model: a quarter of the memory per cached token, faster attention over long "
                   "contexts. Each graph is checked against its fp32 cache (after short and long contexts) "
                   "before the bundle is written.")
@click.option("--kv-calibration", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="With --kv-cache int8: text like what you will serve (one per line) to calibrate the scales on; "
                   "default: built-in Chinese sentences.")
@click.option("--num-heads", type=click.IntRange(1), help="Attention heads, for original checkpoints that do not store it.")
@click.option("--threads", type=click.IntRange(1), help="onnxruntime threads during verification.")
@click.option("-f", "--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("-v", "--verbose", is_flag=True, help="Informational messages too.")
def main(src, out, tokenizer, opset, atol, rtol, target, precisions, variants_only, max_kl, no_fallback, no_int4_prefill,
         int4_block_size, kv_cache, kv_calibration, num_heads, threads, overwrite, quiet, verbose):
    """Export the CPM checkpoint SRC to a verified ONNX bundle OUT.

    SRC is a Hugging Face GPT-2 folder (config.json + model.safetensors, pytorch_model.bin or a
    sharded index) or an original CPM-Generate folder (latest_checkpointed_iteration.txt,
    ITER/mp_rank_XX_model_states.pt). The decoder is checked against the PyTorch reference with
    onnxruntime before the bundle is written; on a miss nothing is written and the exit is 1.

    \b
    Examples:
      cpm-export ./CPM-Generate-hf ./cpm-bundle
      cpm-export ./CPM-Generate ./cpm-bundle --tokenizer ./bpe_3w_new/chinese_vocab.model
      cpm-export ./ckpt ./bundle --opset 20 --overwrite
      cpm-export ./ckpt ./bundle-cpu -P int4 -P int8 -P fp32
      cpm-export ./ckpt ./bundle-int4 -P int4 --variants-only
      cpm-export ./ckpt ./bundle-int4-small -P int4 --variants-only --no-int4-prefill
      cpm-export ./ckpt ./bundle-int4-fast -P int4 --int4-block-size 64
      cpm-export ./ckpt ./bundle-serve -P int8 --variants-only --kv-cache int8
      cpm-export ./ckpt ./bundle-v100 --target trt -P fp16
    """
    setup_logging(verbose)
    from ..exporter import ExportOptions, ParityError, export_bundle
    from ..runtime.errors import CPMError
    from ..optimize.variants import check_request

    requested = tuple((target, p) for p in dict.fromkeys(precisions or ("fp32",)))
    with user_errors():
        for t, p in requested:
            check_request(t, p)
    if int4_block_size != "32" and (target, "int4") not in requested:
        raise click.UsageError("--int4-block-size applies to the cpu-int4 variant: add -P int4")
    if kv_calibration is not None and kv_cache != "int8":
        raise click.UsageError("--kv-calibration goes with --kv-cache int8")
    options = ExportOptions(opset=opset, atol=atol, rtol=rtol, tokenizer=tokenizer, n_heads=num_heads,
                            overwrite=overwrite, threads=threads, variants=requested, variants_only=variants_only,
                            max_kl=max_kl, fallback=not no_fallback, int4_prefill=not no_int4_prefill,
                            int4_block_size=int(int4_block_size), kv_cache=kv_cache, kv_calibration=kv_calibration)
    console = Console()
    try:
        with stage_progress(STAGES, enabled=not quiet) as step:
            manifest = export_bundle(src, out, options, step)
    except ParityError as e:  # the table first: which cases missed, by how much
        console.print(parity_table(e.report))
        raise click.ClickException(str(e)) from None
    except (CPMError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    console.print(parity_table(standard_graph(manifest)["parity"]))
    console.print(variants_table(manifest))
    console.print(summary_table(out, manifest))
