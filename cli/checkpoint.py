"""cpm-checkpoint: write random checkpoints, convert the original format to Hugging Face."""

from __future__ import annotations

from pathlib import Path

import click

from .common import setup_logging, stage_progress, user_errors

CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(context_settings=CONTEXT)
def main():
    """Create and convert CPM checkpoints."""


@main.command(context_settings=CONTEXT)
@click.argument("preset", type=click.Choice(["tiny", "small", "medium", "large"]))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("-s", "--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same weights).")
@click.option("-t", "--tokenizer", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="sentencepiece model to put in the folder as spiece.model (vocab.json beside it comes too); "
                   "default: CPM's vocabulary, shipped with cpm-deploy.")
@click.option("-f", "--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def random(preset, out, seed, tokenizer, overwrite, quiet):
    """Write a randomly initialised PRESET checkpoint as a Hugging Face folder OUT.

    For trying the toolkit on a fresh machine and for benchmarks: the shapes are real, the weights
    are GPT-2-style noise. Tensors are generated and written one at a time (safetensors, sharded
    past 2 GB), so even Large needs little memory.

    \b
    Examples:
      cpm-checkpoint random small ./cpm-small-random
      cpm-checkpoint random large /data/cpm-large-random --seed 1 --tokenizer ./bpe_3w_new/chinese_vocab.model
    """
    setup_logging()
    from ..exporter.checkpoint_tools import write_random_checkpoint
    from ..exporter.config import CPMConfig
    from ..runtime.text.tokenizer import DEFAULT_VOCAB

    cfg = CPMConfig.from_preset(preset)
    tokenizer = tokenizer or DEFAULT_VOCAB
    with user_errors(), stage_progress({"w": f"writing {preset}"}, not quiet) as step:
        files = write_random_checkpoint(cfg, out, seed, tokenizer, overwrite, lambda d, n: step("w", d, n))
    click.echo(f"wrote {out} ({cfg.n_params / 1e6:,.0f}M parameters, {len(files)} weight file(s))")


@main.command(context_settings=CONTEXT)
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--num-heads", type=click.IntRange(1), help="Attention heads, when the checkpoint does not store them.")
@click.option("-t", "--tokenizer", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="sentencepiece model to include (default: one found beside SRC, else CPM's vocabulary "
                   "shipped with cpm-deploy).")
@click.option("-f", "--overwrite", is_flag=True, help="Replace OUT if it exists.")
def convert(src, out, num_heads, tokenizer, overwrite):
    """Convert the original model-parallel checkpoint SRC to a Hugging Face folder OUT.

    Partitions are merged (the stride-3 query/key/value layout included, weight and bias), and the
    result is written as safetensors that transformers' GPT2LMHeadModel loads.

    \b
    Example:
      cpm-checkpoint convert ./CPM-Generate ./CPM-Generate-hf
    """
    setup_logging()
    from ..exporter.checkpoint_tools import convert_to_hf

    with user_errors():
        files = convert_to_hf(src, out, num_heads, tokenizer, overwrite)
    click.echo(f"wrote {out} ({len(files)} weight file(s))")
