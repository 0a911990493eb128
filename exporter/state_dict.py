"""Checking a state dict against the model it should fill, and building the model from it."""

from __future__ import annotations

import torch

from .errors import ExportError
from .config import CPMConfig
from .model import CPMModel

# Buffers that Hugging Face GPT-2 checkpoints may carry and that hold no learned weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class CheckpointError(ExportError, ValueError):
    """A checkpoint that cannot be loaded as given (user-facing, one clear message)."""


def expected_shapes(cfg: CPMConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = CPMModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def normalise_hf_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept GPT2LMHeadModel and bare GPT2Model key styles; drop non-learned buffers and the tied head."""
    out = {}
    for key, value in sd.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        if key == "lm_head.weight":
            continue  # tied to transformer.wte.weight; checked by check_tied_head
        out[key if key.startswith("transformer.") else f"transformer.{key}"] = value
    return out


def check_tied_head(sd: dict[str, torch.Tensor]) -> None:
    head, wte = sd.get("lm_head.weight"), sd.get("transformer.wte.weight", sd.get("wte.weight"))
    if head is not None and wte is not None and head.shape == wte.shape and head.device.type != "meta":
        if not torch.equal(head, wte):
            raise CheckpointError("lm_head.weight differs from transformer.wte.weight; CPM ties its output head")


def validate(sd: dict[str, torch.Tensor], cfg: CPMConfig) -> None:
    """Report every missing, unexpected and wrongly shaped key by name, all at once."""
    want = expected_shapes(cfg)
    problems = []
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    for key in sorted(set(want) & set(sd)):
        if tuple(sd[key].shape) != want[key]:
            problems.append(f"{key} has shape {list(sd[key].shape)}, expected {list(want[key])}")
    for key, t in sd.items():
        if key in want and not t.is_floating_point():
            problems.append(f"{key} has dtype {t.dtype}, expected a floating-point tensor")
    if problems:
        raise CheckpointError("checkpoint does not match the model config:\n  " + "\n  ".join(problems))


def build_model(sd: dict[str, torch.Tensor], cfg: CPMConfig) -> CPMModel:
    """Validate, then move the tensors into a model without a second copy (fp32, eval mode)."""
    validate(sd, cfg)
    with torch.device("meta"):
        model = CPMModel(cfg)
    sd = {k: (v if v.dtype == torch.float32 else v.float()).contiguous() for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def random_tensors(cfg: CPMConfig, seed: int, std: float = 0.02):
    """GPT-2-style random weights, generated tensor by tensor in a fixed order (reproducible).

    LayerNorm gains are 1 + noise and biases are noise, so every parameter matters in parity tests.
    """
    g = torch.Generator().manual_seed(seed)
    for name, shape in expected_shapes(cfg).items():
        base = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
        yield name, base + std * torch.randn(shape, generator=g)
