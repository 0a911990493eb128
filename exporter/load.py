"""One entry point for every checkpoint format: detect, load, validate, build the reference model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import CPMConfig
from .hf_format import find_tokenizer, is_hf_folder, load_hf_state_dict
from .megatron_format import is_megatron_folder, load_megatron
from .model import CPMModel
from .state_dict import CheckpointError, build_model


@dataclass
class Checkpoint:
    model: CPMModel
    config: CPMConfig
    format: str  # "huggingface" or "cpm-original"
    tokenizer: Path | None  # sentencepiece model found beside the weights


def detect_format(src: Path) -> str:
    if not src.exists():
        raise CheckpointError(f"{src} does not exist")
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder; pass the checkpoint folder, not a file inside it")
    if is_hf_folder(src):
        return "huggingface"
    if is_megatron_folder(src):
        return "cpm-original"
    raise CheckpointError(
        f"{src} is neither a Hugging Face folder (config.json) nor an original CPM checkpoint "
        "(latest_checkpointed_iteration.txt with ITER/mp_rank_XX_model_states.pt)"
    )


def load_checkpoint(src: Path, n_heads: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> Checkpoint:
    src = Path(src)
    fmt = detect_format(src)
    if fmt == "huggingface":
        cfg = CPMConfig.from_hf_folder(src)
        sd = load_hf_state_dict(src, progress)
        tokenizer = find_tokenizer(src)
    else:
        sd, cfg = load_megatron(src, n_heads, progress)
        # the original release keeps the vocabulary beside the checkpoint folder, not inside it
        tokenizer = find_tokenizer(src) or find_tokenizer(src.parent) or find_tokenizer(src.parent / "bpe_3w_new")
    return Checkpoint(build_model(sd, cfg), cfg, fmt, tokenizer)
