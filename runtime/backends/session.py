"""onnxruntime sessions: provider resolution and a Polygraphy-style runner. No torch here."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import CPMError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


# onnxruntime's CPU GroupQueryAttention reads this variable when a session builds its kernels. Its
# tiled ("flash") path sizes KV tiles from the L2 cache, so a prompt chunk that fits one tile skips
# nothing and takes about twice the plain path's time for the same result (docs/design.md). A
# value the user set stands.
GQA_FLASH_SWITCH = "ORT_GQA_DISABLE_FLASH_ATTENTION"
_env_lock = threading.Lock()  # sessions built in two threads at once must not unset it under each other


class ProviderError(CPMError, ValueError):
    """An execution provider that is unknown or not present in the installed onnxruntime."""


def resolve_providers(provider: str) -> list[str]:
    import onnxruntime as ort

    key = provider.lower()
    if key not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[key]
    available = ort.get_available_providers()
    if name not in available:
        hint = " (install onnxruntime-gpu in place of onnxruntime)" if key != "cpu" else ""
        raise ProviderError(f"{name} is not available in this onnxruntime{hint}; available: {', '.join(available)}")
    # CUDA keeps the CPU provider as fallback for the few ops it lacks; TensorRT falls back to both.
    return {"cpu": [name], "cuda": [name, PROVIDERS["cpu"]],
            "tensorrt": [name, PROVIDERS["cuda"], PROVIDERS["cpu"]]}[key]


def create_session(path: str | Path | bytes, provider: str = "cpu", threads: int | None = None, optimize: bool = True,
                   spin_after_run: bool = True):
    """``path``: a graph file, or a serialized model. ``spin_after_run=False``: the session's threads
    stop spinning as soon as a run returns (they still spin within one), for sessions that take
    turns on the same cores."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not spin_after_run:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    opts.log_severity_level = 3
    providers = resolve_providers(provider)
    with _plain_cpu_attention(provider.lower() == "cpu"):
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), opts, providers=providers)


@contextmanager
def _plain_cpu_attention(cpu: bool):
    """GroupQueryAttention's plain path for the CPU kernels built inside (see GQA_FLASH_SWITCH)."""
    if not cpu:
        yield
        return
    with _env_lock:
        if GQA_FLASH_SWITCH in os.environ:  # the user's (ours is only ever set under the lock)
            yield
            return
        os.environ[GQA_FLASH_SWITCH] = "1"
        try:
            yield
        finally:
            del os.environ[GQA_FLASH_SWITCH]


class OnnxRuntimeRunner:
    """One ``infer(feeds) -> {name: array}`` call, as Polygraphy's runners have."""

    def __init__(self, path: str | Path, provider: str = "cpu", threads: int | None = None, optimize: bool = True):
        self.session = create_session(path, provider, threads, optimize)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_types = {i.name: np_type(i.type) for i in self.session.get_inputs()}

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: v.astype(self.input_types.get(k, v.dtype), copy=False) for k, v in feeds.items()}
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))


def np_type(ort_type: str):
    """The numpy type of an onnxruntime tensor type (None for others)."""
    return {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int64)": np.int64,
            "tensor(int32)": np.int32, "tensor(int8)": np.int8}.get(ort_type, None)
