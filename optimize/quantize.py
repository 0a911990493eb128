"""Weight-only int8 / int4 for CPU: every MatMul, the tied head included, as MatMulNBits.

``keep`` holds MatMuls back from the plain recipe, by node name, one rung each (cheapest first):
  "fp32_activations" - same quantized weights, activations left in fp32 (accuracy level 1);
  "int8"             - int8 weights instead of int4 (an int4 variant's fallback);
  "fp32"             - not quantized at all.
"""

from __future__ import annotations

import logging

import onnx

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits: the fast CPU path (AVX2 / VNNI)
FP32_ACTIVATIONS = 1
RUNGS = ("fp32_activations", "int8", "fp32")


def _quantizer():
    root = logging.getLogger()
    handlers, root_level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.handlers[:], root.level = handlers, root_level  # the module calls logging.basicConfig on import
    return MatMulNBitsQuantizer


def _pass(model: onnx.ModelProto, bits: int, block_size: int, exclude: list[str]) -> onnx.ModelProto:
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


def quantize_matmuls(model: onnx.ModelProto, bits: int, block_size: int = BLOCK_SIZE,
                     keep: dict[str, str] | None = None) -> tuple[onnx.ModelProto, int]:
    """Returns the quantized model and how many MatMuls became MatMulNBits."""
    keep = keep or {}
    if bad := {k: v for k, v in keep.items() if v not in RUNGS or (v == "int8" and bits == 8)}:
        raise ValueError(f"cannot keep {bad} in an int{bits} graph")
    before = sum(n.op_type == "MatMul" for n in model.graph.node)
    out = _pass(model, bits, block_size, [n for n, rung in keep.items() if rung in ("int8", "fp32")])
    if any(rung == "int8" for rung in keep.values()):
        out = _pass(out, 8, block_size, [n for n, rung in keep.items() if rung == "fp32"])
    fp32_acts = {f"{n}_Q{bits}" for n, rung in keep.items() if rung == "fp32_activations"}
    for node in out.graph.node:
        if node.name in fp32_acts:
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = FP32_ACTIVATIONS
    return out, before - sum(n.op_type == "MatMul" for n in out.graph.node)

