"""Hugging Face GPT-2 folders: config.json with safetensors or .bin weights, single or sharded."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import CPMConfig
from .state_dict import CheckpointError, check_tied_head, normalise_hf_keys

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("spiece.model", "chinese_vocab.model")
SHARD_BYTES = 2 * 1024**3


def is_hf_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def find_weights(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder} has config.json but no weights (looked for {', '.join(WEIGHT_FILES)})")


def _shard_files(index_file: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        names = set(weight_map.values())
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_file} is not a valid shard index ({type(e).__name__}: {e})") from None
    root = index_file.parent.resolve()
    for name in sorted(names, key=str):
        if not isinstance(name, str) or not (root / name).resolve().is_relative_to(root):
            raise CheckpointError(f"{index_file.name} names the shard {name!r}, which is not a file inside {index_file.parent}")
    shards = sorted({index_file.parent / name for name in names})
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise CheckpointError(f"{index_file.name} names shards that are missing: {', '.join(missing)}")
    return shards


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:  # weights_only: a checkpoint must never run code while it is read
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt or unsafe files
        raise CheckpointError(f"cannot read {path.name} as a weights-only torch file: {e}") from None


def load_hf_state_dict(folder: Path, progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
    weights = find_weights(folder)
    files = _shard_files(weights) if weights.name.endswith(".index.json") else [weights]
    sd: dict[str, torch.Tensor] = {}
    for i, f in enumerate(files):
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as st:
                    for key in st.keys():
                        sd[key] = st.get_tensor(key)
            except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError and OSError
                raise CheckpointError(f"cannot read {f.name}: {e}") from None
        else:
            sd.update(_load_bin(f))
        if progress:
            progress(i + 1, len(files))
    check_tied_head(sd)
    return normalise_hf_keys(sd)


def find_tokenizer(folder: Path) -> Path | None:
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def save_hf_folder(
    out: Path,
    cfg: CPMConfig,
    tensors: Iterator[tuple[str, torch.Tensor]],
    tokenizer: Path | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> list[Path]:
    """Write config.json and safetensors shards (an index when more than one) from streamed tensors.

    Tensors arrive one at a time, so a Large checkpoint never sits in memory twice.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    written: list[Path] = []
    weight_map: dict[str, int] = {}
    size = 0

    def flush():
        nonlocal size
        path = out / f"part-{len(written):05d}.safetensors"
        save_file(shards[-1], str(path), metadata={"format": "pt"})
        written.append(path)
        shards[-1], size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            flush()
        shards[-1][name] = t.contiguous()
        weight_map[name] = len(written)
        size += nbytes
    flush()
    if len(written) == 1:
        final = [written[0].rename(out / "model.safetensors")]
    else:
        n = len(written)
        final = [p.rename(out / f"model-{i + 1:05d}-of-{n:05d}.safetensors") for i, p in enumerate(written)]
        index = {"metadata": {"total_size": sum(p.stat().st_size for p in final)},
                 "weight_map": {k: final[i].name for k, i in weight_map.items()}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "spiece.model")
        vocab = tokenizer.parent / "vocab.json"
        if vocab.is_file():
            shutil.copyfile(vocab, out / "vocab.json")
    return final
