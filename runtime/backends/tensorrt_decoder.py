"""A TensorRT engine as a decoder: the same prefill / step interface as the onnxruntime decoders.

KV cache: two device buffers per past/present tensor, each sized for the engine's maximum batch
and length, allocated once. The engine reads the past from one and writes the present into the
other; the next step swaps them (a present [B, nh, P+1, hd] is laid out exactly as the next past).
Imports tensorrt and cuda-python only when constructed. Never executed where it was written (no
GPU, no TensorRT there): its tests skip without them.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CPMError
from .tensorrt_versions import check_runtime
from .cuda import check, cudart, device, import_tensorrt
from .padding import left_pad


class TensorRTEngineError(CPMError, RuntimeError):
    """A TensorRT plan this GPU or TensorRT cannot run."""


@dataclass
class TrtState:
    mask: np.ndarray
    position: np.ndarray
    past_len: int
    current: int  # which buffer set holds the past
    batch: int = field(default=0)


class TensorRTDecoder:
    kind = "tensorrt"

    def __init__(self, engine_path: Path, meta: dict, config: dict):
        trt, self.rt = import_tensorrt(), cudart()
        check_runtime(meta, trt.__version__, device()["compute_capability"])
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise TensorRTEngineError(f"TensorRT could not load {Path(engine_path).name}; rebuild it with `cpm-trt build`")
        self.context = self.engine.create_execution_context()
        self.stream = check(self.rt.cudaStreamCreate())  # for cuda-python calls
        self.stream_handle = int(self.stream)  # TensorRT takes the raw handle
        limits = meta["limits"]
        self.max_batch, self.max_prompt, self.max_total = limits["max_batch"], limits["max_prompt"], limits["max_total"]
        self.n_layer, self.n_head = config["n_layer"], config["n_head"]
        self.head_dim, self.vocab = config["n_embd"] // config["n_head"], config["vocab_size"]
        self.past_names = [f"past_key_values.{i}.{k}" for i in range(self.n_layer) for k in ("key", "value")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        elem = 2 if meta.get("kv_dtype") == "fp16" else 4
        kv_bytes = self.max_batch * self.n_head * self.max_total * self.head_dim * elem
        self.kv = [[self._alloc(kv_bytes) for _ in self.past_names] for _ in range(2)]
        tokens = self.max_batch * self.max_total * 8
        self.io = {"input_ids": self._alloc(tokens), "attention_mask": self._alloc(tokens),
                   "position_ids": self._alloc(tokens), "logits": self._alloc(self.max_batch * self.vocab * 4)}
        self.profile = None

    def own_graph_steps(self):
        return nullcontext(self)  # one engine: every step is its own

    def settle(self) -> None:
        pass  # nothing runs in the background

    def _alloc(self, nbytes: int) -> int:
        return int(check(self.rt.cudaMalloc(nbytes)))

    def __del__(self):
        rt = getattr(self, "rt", None)
        for ptr in [p for pair in getattr(self, "kv", []) for p in pair] + list(getattr(self, "io", {}).values()):
            rt.cudaFree(ptr)

    def _upload(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, np.int64)
        check(self.rt.cudaMemcpyAsync(self.io[name], array.ctypes.data, array.nbytes,
                                      self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        self.context.set_input_shape(name, array.shape)

    def _run(self, profile: int, ids, mask, pos, state: TrtState, src: int, dst: int) -> np.ndarray:
        if self.profile != profile:
            self.context.set_optimization_profile_async(profile, self.stream_handle)
            self.profile = profile
        B = ids.shape[0]
        for name, value in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos)):
            self._upload(name, value)
            self.context.set_tensor_address(name, self.io[name])
        for i, (past, present) in enumerate(zip(self.past_names, self.present_names)):
            self.context.set_input_shape(past, (B, self.n_head, state.past_len, self.head_dim))
            self.context.set_tensor_address(past, self.kv[src][i])
            self.context.set_tensor_address(present, self.kv[dst][i])
        self.context.set_tensor_address("logits", self.io["logits"])
        if not self.context.execute_async_v3(self.stream_handle):
            raise TensorRTEngineError("TensorRT execution failed")
        logits = np.empty((B, 1, self.vocab), np.float32)
        check(self.rt.cudaMemcpyAsync(logits.ctypes.data, self.io["logits"], logits.nbytes,
                                      self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        check(self.rt.cudaStreamSynchronize(self.stream))
        return logits[:, -1]

    def prefill(self, rows: list[list[int]], capacity: int, pad_id: int = 0) -> tuple[np.ndarray, TrtState]:
        width = max(len(r) for r in rows)
        if len(rows) > self.max_batch or width > self.max_prompt or capacity > self.max_total:
            raise TensorRTEngineError(f"request (batch {len(rows)}, prompt {width}, total {capacity}) exceeds the engine's "
                              f"profiles (batch {self.max_batch}, prompt {self.max_prompt}, total {self.max_total}); "
                              "rebuild with larger --max-* limits")
        ids, mask, pos = left_pad(rows, pad_id)
        state = TrtState(mask, pos[:, -1:], 0, 0, len(rows))
        logits = self._run(0, ids, mask, pos, state, 0, 1)
        state.current, state.past_len = 1, width
        return logits, state

    def step(self, state: TrtState, tokens: np.ndarray) -> np.ndarray:
        state.mask = np.concatenate([state.mask, np.ones((state.batch, 1), np.int64)], axis=1)
        state.position = state.position + 1
        src, dst = state.current, 1 - state.current
        logits = self._run(1, tokens.reshape(-1, 1), state.mask, state.position, state, src, dst)
        state.current, state.past_len = dst, state.past_len + 1
        return logits
