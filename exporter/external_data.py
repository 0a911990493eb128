"""Streams initializers into ONE external data file, hashing as it writes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

ALIGN = 4096  # page-aligned offsets let onnxruntime memory-map large tensors


class ExternalDataWriter:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self._sha = hashlib.sha256()
        self.offset = 0
        self._written: dict[str, onnx.TensorProto] = {}  # graphs that share this file reuse entries

    def _write(self, buf) -> None:
        self._f.write(buf)
        self._sha.update(buf)
        self.offset += len(buf) if isinstance(buf, bytes) else buf.nbytes

    def add(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        if name in self._written:
            return self._written[name]
        array = np.ascontiguousarray(array)
        pad = -self.offset % ALIGN
        if pad:
            self._write(b"\0" * pad)
        start = self.offset
        self._write(memoryview(array.reshape(-1)).cast("B"))
        t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(array.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self._written[name] = t
        return t

    def close(self) -> str:
        """Close the file; return its sha256."""
        self._f.close()
        return self._sha.hexdigest()
