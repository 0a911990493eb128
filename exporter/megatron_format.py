"""The original CPM-Generate checkpoints: Megatron-LM model-parallel partitions.

Layout (per layer, torch Linear weights [out, in]):
- attention.query_key_value: column-parallel with stride 3. Partition r holds [Q_r; K_r; V_r], the
  rows of its own heads, in its weight AND its bias.
- attention.dense, mlp.dense_4h_to_h: row-parallel (split on the input dim); bias replicated.
- mlp.dense_h_to_4h: column-parallel. word_embeddings: vocabulary rows split across partitions.
- position_embeddings and LayerNorms: replicated.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch

from .config import PRESETS, CPMConfig, ConfigError
from .state_dict import CheckpointError

log = logging.getLogger("cpm_deploy")

ITERATION_FILE = "latest_checkpointed_iteration.txt"
PARTITION_RE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")


def _safe_globals() -> list:
    """What the training code pickles next to the weights, as (object, name in the pickle).

    Megatron/DeepSpeed save args (a Namespace), RNG states (numpy arrays, dtypes and scalars;
    Python tuples; torch tensors), scheduler dicts and DeepSpeed counters. Only globals that
    rebuild data are admitted: no object dtype, nothing that can call arbitrary code. The
    checkpoints of 2020 were written by numpy 1.x (``numpy.core``), newer ones by numpy 2
    (``numpy._core``): both spellings map to the same functions.
    """
    import numpy as np

    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    dtypes = {cls for name in dir(np.dtypes) if isinstance(cls := getattr(np.dtypes, name), type)
              and issubclass(cls, np.dtype) and name != "ObjectDType"}
    named = [(getattr(core, fn), f"{mod}.multiarray.{fn}") for fn in ("_reconstruct", "scalar")
             for mod in ("numpy.core", "numpy._core")]
    plain = [argparse.Namespace, np.ndarray, np.dtype, *sorted(dtypes, key=lambda c: c.__name__)]
    return [(g, f"{g.__module__}.{g.__qualname__}") for g in plain] + named


def is_megatron_folder(folder: Path) -> bool:
    return (folder / ITERATION_FILE).is_file() or any(folder.glob("*/mp_rank_*_model_states.pt"))


def partition_files(folder: Path) -> list[Path]:
    """The partitions of the latest iteration, checked to be complete (00 .. n-1)."""
    it_file = folder / ITERATION_FILE
    if not it_file.is_file():
        raise CheckpointError(f"{it_file} is missing: it names the iteration folder to load")
    iteration = it_file.read_text().strip()
    if not iteration:
        raise CheckpointError(f"{it_file} is empty")
    candidates = [folder / iteration]
    if iteration.isdigit():
        candidates.append(folder / f"iter_{int(iteration):07d}")
    it_dir = next((c for c in candidates if c.is_dir()), None)
    if it_dir is None:
        raise CheckpointError(f"{it_file.name} says {iteration!r} but there is no folder {candidates[0]}")
    ranks = sorted(int(m.group(1)) for p in it_dir.iterdir() if (m := PARTITION_RE.match(p.name)))
    if not ranks:
        raise CheckpointError(f"{it_dir} holds no mp_rank_XX_model_states.pt file")
    expected = list(range(max(ranks) + 1))
    missing = [f"mp_rank_{r:02d}_model_states.pt" for r in expected if r not in ranks]
    if missing:
        raise CheckpointError(f"partition(s) missing in {it_dir}: {', '.join(missing)}")
    return [it_dir / f"mp_rank_{r:02d}_model_states.pt" for r in expected]


def load_partition(path: Path) -> dict:
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise CheckpointError(
                f"{path.name} pickles objects outside the allowlist ({', '.join(unsafe)}); cpm-deploy "
                "admits only data (tensors, numpy arrays, RNG and scheduler state) and will not run code "
                "from a checkpoint"
            ) from None
        raise CheckpointError(f"cannot read {path.name}: {e}") from None


def _unsafe_globals(path: Path) -> list[str]:
    try:
        allowed = {name for _, name in _safe_globals()}
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if g not in allowed]
    except Exception:  # noqa: BLE001 - best effort, only to improve the message
        return []


def _module_state(obj: dict, path: Path) -> dict[str, torch.Tensor]:
    sd = obj.get("module", obj.get("model")) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path.name} has no 'module' state dict")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _n_heads(objs: list[dict], hidden: int, n_heads: int | None) -> int:
    if n_heads:
        return n_heads
    args = objs[0].get("args")
    if args is not None and getattr(args, "num_attention_heads", None):
        return int(args.num_attention_heads)
    for preset in (PRESETS["small"], PRESETS["medium"], PRESETS["large"]):
        if preset.n_embd == hidden:
            log.info("head count not stored in the checkpoint; using %d from the preset of width %d", preset.n_head, hidden)
            return preset.n_head
    raise ConfigError(f"cannot tell the number of attention heads for width {hidden}; pass --num-heads")


def merge_partitions(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Merge Megatron partitions into Hugging Face GPT-2 names and Conv1D [in, out] layout."""
    p0 = parts[0]
    n = len(parts)

    def cat(key, dim):
        return torch.cat([p[key] for p in parts], dim=dim)

    def same(key):
        t = p0[key]
        for r, p in enumerate(parts[1:], 1):
            if not torch.equal(p[key], t):
                log.warning("%s differs between partition 0 and %d; using partition 0", key, r)
        return t

    out = {
        "transformer.wte.weight": cat("word_embeddings.weight", 0),
        "transformer.wpe.weight": same("position_embeddings.weight"),
        "transformer.ln_f.weight": same("transformer.final_layernorm.weight"),
        "transformer.ln_f.bias": same("transformer.final_layernorm.bias"),
    }
    n_layer = len({int(m.group(1)) for k in p0 if (m := re.match(r"transformer\.layers\.(\d+)\.", k))})
    for i in range(n_layer):
        src, dst = f"transformer.layers.{i}.", f"transformer.h.{i}."
        for a, b in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            out[dst + b + ".weight"] = same(src + a + ".weight")
            out[dst + b + ".bias"] = same(src + a + ".bias")
        # stride-3 column parallel: regroup [Q_r; K_r; V_r] per partition into [Q; K; V]
        qkv_w = [p[src + "attention.query_key_value.weight"].chunk(3, dim=0) for p in parts]
        qkv_b = [p[src + "attention.query_key_value.bias"].chunk(3, dim=0) for p in parts]
        w = torch.cat([torch.cat([qkv_w[r][j] for r in range(n)], 0) for j in range(3)], 0)  # [3H, H]
        b = torch.cat([torch.cat([qkv_b[r][j] for r in range(n)], 0) for j in range(3)], 0)  # [3H]
        out[dst + "attn.c_attn.weight"] = w.t().contiguous()
        out[dst + "attn.c_attn.bias"] = b
        out[dst + "attn.c_proj.weight"] = cat(src + "attention.dense.weight", 1).t().contiguous()
        out[dst + "attn.c_proj.bias"] = same(src + "attention.dense.bias")
        out[dst + "mlp.c_fc.weight"] = cat(src + "mlp.dense_h_to_4h.weight", 0).t().contiguous()
        out[dst + "mlp.c_fc.bias"] = cat(src + "mlp.dense_h_to_4h.bias", 0)
        out[dst + "mlp.c_proj.weight"] = cat(src + "mlp.dense_4h_to_h.weight", 1).t().contiguous()
        out[dst + "mlp.c_proj.bias"] = same(src + "mlp.dense_4h_to_h.bias")
    return out


def load_megatron(folder: Path, n_heads: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, torch.Tensor], CPMConfig]:
    files = partition_files(folder)
    objs, parts = [], []
    for i, f in enumerate(files):
        obj = load_partition(f)
        objs.append(obj)
        parts.append(_module_state(obj, f))
        if progress:
            progress(i + 1, len(files))
    declared = objs[0].get("mp_world_size") or getattr(objs[0].get("args"), "model_parallel_size", None)
    if declared and int(declared) != len(files):
        raise CheckpointError(f"the checkpoint was saved with {declared} partitions but {len(files)} are present")
    try:
        sd = merge_partitions(parts)
    except KeyError as e:
        raise CheckpointError(f"original-format checkpoint lacks key {e.args[0]}") from None
    except RuntimeError as e:  # torch.cat on inconsistent partitions
        raise CheckpointError(f"partitions do not fit together: {e}") from None
    n_pos, hidden = sd["transformer.wpe.weight"].shape
    n_layer = sum(1 for k in sd if k.endswith(".ln_1.weight"))
    cfg = CPMConfig(n_layer=n_layer, n_embd=hidden, n_head=_n_heads(objs, hidden, n_heads),
                    vocab_size=sd["transformer.wte.weight"].shape[0], n_positions=n_pos)
    return sd, cfg
