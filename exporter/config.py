"""Model configuration: a frozen dataclass, named presets, and Hugging Face config.json I/O."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ExportError
from ..runtime.bundle.manifest import first_problem

log = logging.getLogger("cpm_deploy")

EOD_ID = 7  # <eod> in CPM's vocabulary ends a text; not GPT-2's 50256


class ConfigError(ExportError, ValueError):
    """A configuration that cpm-deploy cannot honour (user error, not a bug)."""


@dataclass(frozen=True)
class CPMConfig:
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    vocab_size: int = 30000
    n_positions: int = 1024
    layer_norm_epsilon: float = 1e-5
    eod_id: int = EOD_ID

    def __post_init__(self):
        for field in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"{field} must be positive, got {getattr(self, field)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if not 0 <= self.eod_id < self.vocab_size:
            raise ConfigError(f"eod_id {self.eod_id} is outside the vocabulary (0..{self.vocab_size - 1})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_params(self) -> int:
        h, layer = self.n_embd, 12 * self.n_embd**2 + 13 * self.n_embd
        return self.vocab_size * h + self.n_positions * h + self.n_layer * layer + 2 * h

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CPMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_preset(cls, name: str) -> "CPMConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None

    # -- Hugging Face GPT-2 config.json ---------------------------------------------------------
    @classmethod
    def from_hf_config(cls, d: dict) -> "CPMConfig":
        """Read a GPT2Config dict, refusing what this architecture does not implement."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json holds {type(d).__name__}, not an object")
        try:
            d = {**d, **_HFFields.model_validate(d).model_dump(exclude_unset=True)}
        except ValidationError as e:
            raise ConfigError(f"config.json {first_problem(e)}") from None
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"activation_function {act!r} is not CPM's tanh GELU (gelu_new)")
        n_embd = d.get("n_embd", 768)
        n_inner = d.get("n_inner")
        if n_inner not in (None, 4 * n_embd):
            raise ConfigError(f"n_inner {n_inner} is not 4 * n_embd; CPM's MLP is 4x wide")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if d.get(flag):
                raise ConfigError(f"{flag}=true is not part of CPM's architecture")
        if d.get("scale_attn_weights") is False:
            raise ConfigError("scale_attn_weights=false is not part of CPM's architecture")
        if d.get("tie_word_embeddings") is False:
            raise ConfigError("tie_word_embeddings=false: CPM's output head is the token embedding")
        cfg = cls(
            n_layer=d.get("n_layer", 12),
            n_embd=n_embd,
            n_head=d.get("n_head", 12),
            vocab_size=d.get("vocab_size", 30000),
            n_positions=d.get("n_positions") or d.get("n_ctx") or 1024,
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
        )
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = d.get(key)
            if isinstance(value, int) and not 0 <= value < cfg.vocab_size:
                log.warning(
                    "config.json %s=%d is outside the %d-token vocabulary (the published CPM config "
                    "says 50256, GPT-2's id); cpm-deploy uses <eod>=%d", key, value, cfg.vocab_size, cfg.eod_id,
                )
        return cfg

    def to_hf_config(self) -> dict:
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "n_layer": self.n_layer,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_inner": None,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "vocab_size": self.vocab_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "bos_token_id": self.eod_id,
            "eos_token_id": self.eod_id,
            "tie_word_embeddings": True,
            "scale_attn_weights": True,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "initializer_range": 0.02,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf_folder(cls, folder: Path) -> "CPMConfig":
        path = Path(folder) / "config.json"
        try:
            return cls.from_hf_config(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ConfigError(f"{path} not found: a Hugging Face folder needs its config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None


class _HFFields(BaseModel):
    """The config.json fields read above, with their JSON types (a string where a number belongs
    is named, not coerced); any other field passes through."""

    model_config = ConfigDict(strict=True, extra="allow")
    n_layer: Annotated[int, Field(gt=0)] = 12
    n_embd: Annotated[int, Field(gt=0)] = 768
    n_head: Annotated[int, Field(gt=0)] = 12
    vocab_size: Annotated[int, Field(gt=0)] = 30000
    n_positions: Annotated[int, Field(gt=0)] | None = None
    n_ctx: Annotated[int, Field(gt=0)] | None = None
    n_inner: int | None = None
    layer_norm_epsilon: Annotated[float, Field(gt=0)] = 1e-5
    activation_function: str = "gelu_new"
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False


PRESETS: dict[str, CPMConfig] = {
    "tiny": CPMConfig(n_layer=2, n_embd=64, n_head=4),  # tests: real vocabulary, toy width
    "small": CPMConfig(n_layer=12, n_embd=768, n_head=12),
    "medium": CPMConfig(n_layer=24, n_embd=1024, n_head=16),
    "large": CPMConfig(n_layer=32, n_embd=2560, n_head=32),  # head_dim 80, 2.6B parameters
}
