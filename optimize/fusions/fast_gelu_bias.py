"""Add(x, bias) -> FastGelu  =>  FastGelu(x, bias): the bias add folded into the GELU kernel.

onnxscript's BiasGelu rule covers the erf GELU only; CPM uses the tanh one (FastGelu).
"""

from __future__ import annotations

from onnxscript.rewriter import _ir_utils, pattern


class FastGeluBias(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, bias):
        return op.FastGelu(op.Add(x, bias), _domain="com.microsoft")

    def check(self, op, x, bias, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if bias.const_value is None or not _ir_utils.has_rank(bias, 1):
            return result.fail("bias is not a constant 1-D tensor", bias)
        return result

    def rewrite(self, op, x, bias, **_):
        return op.FastGelu(x, bias, _domain="com.microsoft")


rules = pattern.RewriteRuleSet([FastGeluBias.rule()])
