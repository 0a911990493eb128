"""Writing checkpoints: random ones of any preset, and original-format -> Hugging Face conversion."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..runtime.text.tokenizer import DEFAULT_VOCAB
from .config import CPMConfig
from .hf_format import save_hf_folder
from .load import load_checkpoint
from .staging import staged_dir
from .state_dict import expected_shapes, random_tensors


def write_random_checkpoint(cfg: CPMConfig, out: Path, seed: int = 0, tokenizer: Path | None = None,
                            overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """A Hugging Face folder (safetensors, sharded past 2 GB) of random weights, written tensor by tensor."""
    total = len(expected_shapes(cfg))

    def tensors():
        for i, item in enumerate(random_tensors(cfg, seed)):
            yield item
            if progress:
                progress(i + 1, total)

    with staged_dir(out, overwrite) as tmp:
        files = save_hf_folder(tmp, cfg, tensors(), tokenizer)
    return [Path(out) / f.name for f in files]


def convert_to_hf(src: Path, out: Path, n_heads: int | None = None, tokenizer: Path | None = None,
                  overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Any readable checkpoint (the original model-parallel format above all) -> a Hugging Face folder."""
    ckpt = load_checkpoint(src, n_heads, progress)
    with staged_dir(out, overwrite) as tmp:
        files = save_hf_folder(tmp, ckpt.config, iter(ckpt.model.state_dict().items()),
                               tokenizer or ckpt.tokenizer or DEFAULT_VOCAB)
    return [Path(out) / f.name for f in files]
