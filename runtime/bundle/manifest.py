"""The bundle manifest's schema: a bundle is untrusted input, checked before anything is opened.

Only the fields the runtime reads are declared; the exporter's extra records (parity reports,
timings, fusion counts) pass through unchecked. Every file name is a plain relative path: no
absolute paths, no ``..``, no NUL; where it points (symlinks included) is checked in bundle.py.
"""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

FORMAT = "cpm-deploy-bundle"
FORMAT_VERSION = 1


def _relative(name: str) -> str:
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if not name or "\x00" in name or posix.is_absolute() or windows.is_absolute() or windows.drive:
        raise ValueError(f"{name!r} is not a relative path inside the bundle")
    if ".." in posix.parts or ".." in windows.parts:
        raise ValueError(f"{name!r} leads out of the bundle ('..')")
    return name


RelPath = Annotated[str, StringConstraints(min_length=1), AfterValidator(_relative)]
Positive = Annotated[int, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class FileEntry(_Strict):
    bytes: Annotated[int, Field(ge=0)]
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class ModelConfig(_Strict):
    n_layer: Positive
    n_embd: Positive
    n_head: Positive
    vocab_size: Positive
    n_positions: Positive
    layer_norm_epsilon: float = 1e-5
    eod_id: Annotated[int, Field(ge=0)] = 7


class Tokenizer(_Strict):
    file: RelPath
    vocab: RelPath | None = None


class GraphFile(_Strict):
    file: RelPath
    data: RelPath | None = None


class Graph(_Strict):
    file: RelPath
    data: RelPath | None = None
    precision: str = "fp32"
    kv_cache: Literal["concat", "shared"] = "concat"
    kv_dtype: Literal["fp32", "fp16", "int8"] | None = None  # what the KV cache holds; None: the precision's
    prefill: GraphFile | None = None  # the graph prompts run on, sharing the KV buffers
    score: GraphFile | None = None  # its scoring twin: every position's log-probability in one pass


class EngineLimits(_Strict):
    max_batch: Positive
    max_prompt: Positive
    max_total: Positive


class Engine(_Strict):
    file: RelPath
    timing_cache: RelPath | None = None
    tensorrt: str
    compute_capability: tuple[int, int]
    limits: EngineLimits
    kv_dtype: Literal["fp16", "fp32"] = "fp32"


class Manifest(_Strict):
    format: Literal["cpm-deploy-bundle"]
    format_version: int
    model: ModelConfig
    tokenizer: Tokenizer | None = None
    graphs: Annotated[dict[str, Graph], Field(min_length=1)]
    default_graph: str | None = None
    engines: dict[str, Engine] = {}
    files: dict[RelPath, FileEntry]


def first_problem(error: ValidationError) -> str:
    """One line naming the field: ``graphs.cpu-int4.file: '../x.onnx' leads out of the bundle``."""
    e = error.errors()[0]
    where = ".".join(str(p) for p in e["loc"]) or "(top level)"
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    shown = "" if isinstance(got, (dict, list)) or "Value error" in e["msg"] else f" (got {got!r:.60})"
    more = f"; {len(error.errors()) - 1} more problem(s)" if len(error.errors()) > 1 else ""
    return f"field {where}: {msg}{shown}{more}"
