"""One decoder step on onnxruntime with IOBinding.

Presents come back as OrtValues on the session's device and are bound as the next step's past
directly: the KV cache never goes through numpy between steps. Only the last position's logits
are copied out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .session import create_session


class OrtDecoder:
    def __init__(self, path: str | Path, config: dict, provider: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        self.ort = ort
        self.session = create_session(path, provider, threads)
        self.n_layer, self.n_head = config["n_layer"], config["n_head"]
        self.head_dim = config["n_embd"] // config["n_head"]
        self.device = "cuda" if provider in ("cuda", "tensorrt") else "cpu"
        self.past_names = [f"past_key_values.{i}.{k}" for i in range(self.n_layer) for k in ("key", "value")]
        self.present_names = [f"present.{i}.{k}" for i in range(self.n_layer) for k in ("key", "value")]

    def empty_past(self, batch: int) -> list:
        zeros = np.zeros((batch, self.n_head, 0, self.head_dim), np.float32)
        return [self.ort.OrtValue.ortvalue_from_numpy(zeros, self.device) for _ in self.past_names]

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                 past: list) -> tuple[np.ndarray, list]:
        """input_ids/position_ids [B, S], attention_mask [B, P+S] -> last logits [B, V], presents."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
        for name, value in zip(self.past_names, past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()[:, -1, :]
        return logits, outputs[1:]
