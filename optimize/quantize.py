"""Quantized MatMuls for CPU, the tied head included.

int8: DynamicQuantizeMatMul - int8 weights per output column, activations quantized to uint8 at
  run time (one scale per call). MLAS runs it as an integer GEMM (VNNI / AMX where the CPU has
  them): on a 2-core AMX Xeon 6x faster than MatMulNBits on a 512-token prompt and 2x at batch-16
  decode, as fast at batch 1. The price: one activation scale per call couples the rows of a
  batch (a sequence's logits move slightly with its neighbours).
int4: MatMulNBits - 4-bit weights in blocks of 32 (or 64, 128: fewer fp32 scales to read, faster
  decode steps, coarser weights), activations quantized to int8 per block and row (accuracy level 4);
  the fastest batch-1 decode, slow on prompts (the int8 graph takes those).

``keep`` holds MatMuls back from the plain recipe, by node name, one rung each (cheapest first):
  "fp32_activations" - MatMulNBits with the variant's weight bits, activations left in fp32;
  "int8"             - int8 weights instead of int4 (an int4 variant's fallback);
  "fp32"             - not quantized at all.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

BLOCK_SIZE = 32
BLOCK_SIZES = (32, 64, 128)  # 4-bit blocks offered; 8-bit MatMulNBits (an int4 graph's int8 rung) keeps 32
ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits: the fast CPU path (AVX2 / VNNI)
FP32_ACTIVATIONS = 1
RUNGS = ("fp32_activations", "int8", "fp32")
QUANTIZED_OPS = ("DynamicQuantizeMatMul", "MatMulNBits")
BIAS_INPUT = {"DynamicQuantizeMatMul": 4, "MatMulNBits": 5}  # where each op takes an optional bias
SUFFIX = "_Q"  # a quantized node is named <MatMul name>_Q<bits>


def _quantizer():
    root = logging.getLogger()
    handlers, root_level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.handlers[:], root.level = handlers, root_level  # the module calls logging.basicConfig on import
    return MatMulNBitsQuantizer


def _nbits_pass(model: onnx.ModelProto, bits: int, block_size: int, exclude: list[str]) -> onnx.ModelProto:
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        quantizer = _quantizer()(model, bits=bits, block_size=block_size, is_symmetric=True,
                                 accuracy_level=ACCURACY_LEVEL, nodes_to_exclude=exclude,
                                 op_types_to_quantize=("MatMul",))
        quantizer.process()
    finally:
        logger.setLevel(level)
    return quantizer.model.model


def per_column_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column of a [K, N] weight: (int8 [K, N], float scale [N])."""
    amax = np.abs(weight).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    return np.clip(np.rint(weight / scale), -127, 127).astype(np.int8), scale


def _dynamic_int8_pass(model: onnx.ModelProto, exclude: set[str]) -> onnx.ModelProto:
    """Every MatMul with a constant 2-D weight (and not excluded) -> DynamicQuantizeMatMul."""
    inits = {t.name: t for t in model.graph.initializer}
    users = _consumers(model)
    nodes, added, dropped = [], [], set()
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or node.name in exclude or len(weight.dims) != 2:
            nodes.append(node)
            continue
        q, scale = per_column_int8(numpy_helper.to_array(weight))
        added += [numpy_helper.from_array(q, f"{weight.name}_int8"), numpy_helper.from_array(scale, f"{weight.name}_scale")]
        nodes.append(onnx.helper.make_node("DynamicQuantizeMatMul", [node.input[0], added[-2].name, added[-1].name],
                                           list(node.output), name=f"{node.name}{SUFFIX}8", domain="com.microsoft"))
        if len(users[weight.name]) == 1:
            dropped.add(weight.name)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [t for t in model.graph.initializer if t.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + added)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return model


def quantize_matmuls(model: onnx.ModelProto, bits: int, block_size: int = BLOCK_SIZE,
                     keep: dict[str, str] | None = None) -> tuple[onnx.ModelProto, int]:
    """Returns the quantized model and how many MatMuls became quantized ops. ``block_size``: the
    4-bit weights' block (an int4 graph's int8 rung and int8 graphs use BLOCK_SIZE)."""
    keep = keep or {}
    if block_size not in BLOCK_SIZES or (bits == 8 and block_size != BLOCK_SIZE):
        raise ValueError(f"block size {block_size} is not offered for int{bits} (4-bit: {BLOCK_SIZES}; 8-bit: {BLOCK_SIZE})")
    if bad := {k: v for k, v in keep.items() if v not in RUNGS or (v == "int8" and bits == 8)}:
        raise ValueError(f"cannot keep {bad} in an int{bits} graph")
    before = sum(n.op_type == "MatMul" for n in model.graph.node)
    fp32 = [n for n, rung in keep.items() if rung == "fp32"]
    if bits == 8:  # the rest of the int8 recipe; held-back MatMuls stay for the MatMulNBits pass below
        out = _nbits_pass(_dynamic_int8_pass(model, set(keep)), 8, BLOCK_SIZE, fp32)
    else:
        out = _nbits_pass(model, bits, block_size, [n for n, rung in keep.items() if rung in ("int8", "fp32")])
        if any(rung == "int8" for rung in keep.values()):
            out = _nbits_pass(out, 8, BLOCK_SIZE, fp32)
    fp32_acts = {n for n, rung in keep.items() if rung == "fp32_activations"}
    for node in out.graph.node:
        if node.op_type == "MatMulNBits" and node.name.rsplit(SUFFIX, 1)[0] in fp32_acts:
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = FP32_ACTIVATIONS
    return out, before - sum(n.op_type == "MatMul" for n in out.graph.node)


def fold_bias(model: onnx.ModelProto) -> int:
    """Add(quantized MatMul, constant [N] bias) -> the op's own bias input: one pass over the output
    fewer per MatMul (faster prompts and decode steps). Returns the count."""
    inits = {t.name: t for t in model.graph.initializer}
    users = _consumers(model)
    graph_outputs = {o.name for o in model.graph.output}
    folded = set()
    for node in model.graph.node:
        if node.op_type not in BIAS_INPUT or node.output[0] in graph_outputs or len(node.input) > BIAS_INPUT[node.op_type]:
            continue
        consumers = users.get(node.output[0], [])
        if len(consumers) != 1 or consumers[0].op_type != "Add":
            continue
        add = consumers[0]
        bias = inits.get(add.input[1] if add.input[0] == node.output[0] else add.input[0])
        if bias is None or list(bias.dims) != [_columns(node, inits)] or bias.data_type != onnx.TensorProto.FLOAT:
            continue
        node.input.extend([""] * (BIAS_INPUT[node.op_type] - len(node.input)) + [bias.name])
        node.output[0] = add.output[0]
        folded.add(id(add))
    nodes = [n for n in model.graph.node if id(n) not in folded]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return len(folded)


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Value name -> the nodes that read it."""
    users: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _columns(node: onnx.NodeProto, inits: dict) -> int:
    if node.op_type == "MatMulNBits":
        return next(a.i for a in node.attribute if a.name == "N")
    weight = inits.get(node.input[1])
    return weight.dims[1] if weight is not None else -1
