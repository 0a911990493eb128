"""Graph variants of a bundle: (target, precision) -> files written beside the base graphs.

| target | precision | graph |
| cpu, cuda | fp32 | fused for onnxruntime (GroupQueryAttention, shared KV), same data file as the base |
| cpu | int8 | fused + DynamicQuantizeMatMul (int8 weights, head included), own data file |
| cpu | int4 | fused + MatMulNBits 4-bit weights (blocks of 32, 64 or 128) for decode steps; prompts run on the int8 graph |
| cuda | fp16 | fused, fp16 with LayerNorm and softmax in fp32, own data file |
| trt | fp32 | the standard last-position graph itself (TensorRT parses standard ops only) |
| trt | fp16 | the standard graph in fp16 with fp32 islands, own data file |
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from .errors import OptimizeError
from ..runtime.bundle.reader import BASE_DATA, GENERATION_GRAPH
from .fuse import fuse_for_ort
from .fusions import tied_head_matmul
from .precision import to_fp16
from .quantize import BLOCK_SIZE, BLOCK_SIZES, QUANTIZED_OPS, SUFFIX, fold_bias, quantize_matmuls

TARGETS = {"cpu": ("fp32", "int8", "int4"), "cuda": ("fp32", "fp16"), "trt": ("fp32", "fp16")}
class VariantError(OptimizeError, ValueError):
    pass


@dataclass
class Variant:
    name: str
    target: str
    precision: str
    file: str
    data: str | None
    kv_cache: str  # "shared" (GroupQueryAttention buffers) or "concat" (standard past/present)
    fusions: dict
    ops: dict
    kept: dict | None = None  # MatMul name -> rung held back from the plain recipe (quantize.py)
    prefill: dict | None = None  # {"file", "data"}: the graph prompts run on, when not this one
    block_size: int | None = None  # int4: the 4-bit weights' block

    def manifest_entry(self) -> dict:
        entry = {"file": self.file, "data": self.data, "target": self.target, "precision": self.precision,
                 "kv_cache": self.kv_cache, "logits": "last", "fusions": self.fusions, "ops": self.ops}
        return (entry | ({"block_size": self.block_size} if self.block_size else {})
                | ({"kept": self.kept} if self.kept else {}) | ({"prefill": self.prefill} if self.prefill else {}))


def check_request(target: str, precision: str) -> None:
    if target not in TARGETS:
        raise VariantError(f"unknown target {target!r}; choose {', '.join(TARGETS)}")
    if precision not in TARGETS[target]:
        raise VariantError(f"precision {precision} is not built for target {target} "
                           f"(it has {', '.join(TARGETS[target])})")


def check_int4_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise VariantError(f"int4 block size {block_size} is not offered; choose {', '.join(map(str, BLOCK_SIZES))}")


def build(folder: Path, target: str, precision: str, n_layer: int, keep: dict[str, str] | None = None,
          prefill: Variant | None = None, int4_block_size: int = BLOCK_SIZE) -> Variant:
    """Write the variant's graph (and data) into ``folder``, which holds the base graphs. ``keep``
    (int8/int4 only) holds named MatMuls back from the plain recipe (see quantize.py); ``prefill``
    (cpu-int4 only) is the built graph its prompts run on; ``int4_block_size`` is read by cpu-int4 only."""
    check_request(target, precision)
    name = f"{target}-{precision}"
    if prefill is not None and (target, precision, prefill.kv_cache) != ("cpu", "int4", "shared"):
        raise VariantError(f"only cpu-int4 takes a prefill graph, not {name}")
    file = f"decoder_{target}_{precision}.onnx"
    data = f"{file}.data"
    if target == "trt" and precision == "fp32":
        model = onnx.load(str(folder / GENERATION_GRAPH), load_external_data=False)
        return Variant(name, target, precision, GENERATION_GRAPH, BASE_DATA, "concat", {}, _ops(model))
    if target == "trt":
        model = to_fp16(onnx.load(str(folder / GENERATION_GRAPH)))
        _save(model, folder / file, data)
        return Variant(name, target, precision, file, data, "concat", {}, _ops(model))

    fused = ir.load(str(folder / GENERATION_GRAPH))
    counts = fuse_for_ort(fused, n_layer, skip_layer_norm=target == "cuda")  # see fuse.py for the CPU's choice
    if precision == "fp32":  # weights unchanged: keep pointing at the base data file
        ir.save(fused, str(folder / file))
        return Variant(name, target, precision, file, BASE_DATA, "shared", counts, _ops(ir.to_proto(fused)))
    if precision in ("int8", "int4"):
        counts["tied_head_matmul"] = tied_head_matmul.rules.apply_to_model(fused)
        proto = _with_data(fused, folder)
        bits, block = (8, BLOCK_SIZE) if precision == "int8" else (4, int4_block_size)
        proto, counts["quantized_matmuls"] = quantize_matmuls(proto, bits, block, keep)
        counts["bias_into_quantized"] = fold_bias(proto)
        wanted = 4 * n_layer + 1 - sum(rung == "fp32" for rung in (keep or {}).values())
        if counts["tied_head_matmul"] != 1 or counts["quantized_matmuls"] != wanted:
            raise VariantError(f"quantization covered {counts['quantized_matmuls']} of {wanted} MatMuls")
    else:  # cuda fp16
        proto = to_fp16(_with_data(fused, folder))
    _save(proto, folder / file, data)
    return Variant(name, target, precision, file, data, "shared", counts, _ops(proto), keep or None,
                   {"file": prefill.file, "data": prefill.data} if prefill else None,
                   int4_block_size if precision == "int4" else None)


def _with_data(model: ir.Model, folder: Path) -> onnx.ModelProto:
    proto = ir.to_proto(model)
    onnx.load_external_data_for_model(proto, str(folder))
    return proto


def _save(model: onnx.ModelProto, path: Path, data: str) -> None:
    (path.parent / data).unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
              size_threshold=1024)
    os.chmod(path.parent / data, 0o644)  # onnx writes it 0600


def _ops(model: onnx.ModelProto) -> dict:
    return dict(Counter(n.op_type for n in model.graph.node).most_common())


def quantized_matmuls(folder: Path, variant: Variant) -> list[str]:
    """The MatMuls a built int8/int4 variant quantized, by their names before quantization."""
    model = onnx.load(str(folder / variant.file), load_external_data=False)
    return [n.name.rsplit(SUFFIX, 1)[0] for n in model.graph.node if n.op_type in QUANTIZED_OPS]
