"""Weight-only int8 / int4 for CPU: every MatMul, the tied head included, as MatMulNBits."""

from __future__ import annotations

import logging

import onnx

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits: the fast CPU path (AVX2 / VNNI)


def quantize_matmuls(model: onnx.ModelProto, bits: int, block_size: int = BLOCK_SIZE) -> tuple[onnx.ModelProto, int]:
    """Returns the quantized model and how many MatMuls became MatMulNBits."""
    root = logging.getLogger()
    handlers, root_level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.handlers[:], root.level = handlers, root_level  # the module calls logging.basicConfig on import
    before = sum(n.op_type == "MatMul" for n in model.graph.node)
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                         accuracy_level=ACCURACY_LEVEL, op_types_to_quantize=("MatMul",))
        quantizer.process()
    finally:
        logger.setLevel(level)
    out = quantizer.model.model
    return out, before - sum(n.op_type == "MatMul" for n in out.graph.node)
