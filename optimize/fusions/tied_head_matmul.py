"""Gemm(x, W, transB=1) with a constant W  =>  MatMul(x, W^T) on a transposed copy.

The tied head is a Gemm on the embedding so fp32 graphs keep one copy of it. Weight-only
quantizers handle MatMul, so quantized variants first give the head its own [H, V] weight,
which the quantizer then replaces by a packed low-bit copy (the embedding stays for Gather).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern


class TiedHeadToMatMul(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, weight):
        return op.Gemm(x, weight, transB=1, _outputs=["logits"])

    def check(self, op, x, weight, logits, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        gemm = logits.producer()
        if weight.const_value is None:
            return result.fail("head weight is not a constant", weight)
        if gemm.attributes.get_int("transA", 0) or gemm.attributes.get_float("alpha", 1.0) != 1.0 or len(gemm.inputs) > 2:
            return result.fail("only a plain Gemm with transB=1 and no bias is the tied head")
        return result

    def rewrite(self, op, x, weight, **_):
        transposed = ir.tensor(weight.const_value.numpy().T.copy(), name=f"{weight.name}.T")
        return op.MatMul(x, op.initializer(transposed))


rules = pattern.RewriteRuleSet([TiedHeadToMatMul.rule()])
