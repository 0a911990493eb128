"""Which TensorRT release can do what: the Volta guard, opset limits, the FP16 builder flag.

On the runtime side: the engine runtime checks an engine against them, and the builder in
optimize/tensorrt applies them before a build."""

from __future__ import annotations

import re

from ..errors import CPMError

LAST_VOLTA = (10, 4)  # 10.5 and later refuse SM 7.0 at build time; 11.x is built on CUDA 13 (no sm_70)
VOLTA_RELEASES = "tensorrt-cu12==10.4.0 (or 8.6.x)"


class TensorRTVersionError(CPMError, RuntimeError):
    pass


def parse(version: str) -> tuple[int, int, int]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version or "")
    if not m:
        raise TensorRTVersionError(f"cannot read a TensorRT version from {version!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def max_opset(version: str) -> int:
    """The newest ONNX opset the release's parser supports (onnx-tensorrt's operators.md per release)."""
    v = parse(version)
    if v < (8, 5):
        return 13
    if v < (10, 0):
        return 17
    if v < (10, 15):
        return 20
    return 24


def check_build(version: str, compute_capability: tuple[int, int] | None, precision: str = "fp16") -> None:
    """Refuse, with the reason and the fix, a build this TensorRT cannot make."""
    v = parse(version)
    if compute_capability is not None and compute_capability < (7, 5) and v[:2] > LAST_VOLTA:
        raise TensorRTVersionError(
            f"TensorRT {version} cannot build engines for compute capability "
            f"{compute_capability[0]}.{compute_capability[1]} (V100 is 7.0): 10.5 and later dropped Volta. "
            f"Install {VOLTA_RELEASES}, e.g. pip install 'cpm-deploy[tensorrt]'")
    if precision == "fp16" and v[0] >= 11:
        raise TensorRTVersionError(
            f"TensorRT {version} removed BuilderFlag.FP16 (weakly typed fp16 builds); "
            f"use {VOLTA_RELEASES} for these engines")
    if v < (8, 6):
        raise TensorRTVersionError(f"TensorRT {version} predates LayerNormalization support (8.6); use 8.6 or 10.x")


def check_runtime(engine_meta: dict, version: str, compute_capability: tuple[int, int]) -> None:
    """An engine runs only on the GPU architecture and TensorRT release it was built with."""
    built_cc = tuple(engine_meta["compute_capability"])
    if built_cc != tuple(compute_capability) or engine_meta["tensorrt"] != version:
        raise TensorRTVersionError(
            f"this engine was built for compute capability {built_cc[0]}.{built_cc[1]} with TensorRT "
            f"{engine_meta['tensorrt']}; this machine has {compute_capability[0]}.{compute_capability[1]} with "
            f"TensorRT {version}. Engines do not move between GPU architectures or TensorRT releases: "
            "rebuild it here with `cpm-trt build`")
