"""Gelu(x, approximate="tanh") (opset 20)  =>  com.microsoft.FastGelu(x), which also takes the bias."""

from __future__ import annotations

from onnxscript.rewriter import pattern


class NativeTanhGelu(pattern.RewriteRuleClassBase):
    def pattern(self, op, x):
        return op.Gelu(x, _allow_other_attributes=True, _outputs=["gelu"])

    def check(self, op, x, gelu, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if gelu.producer().attributes.get_string("approximate", "none") != "tanh":
            return result.fail("not the tanh approximation")
        return result

    def rewrite(self, op, x, **_):
        return op.FastGelu(x, _domain="com.microsoft")


rules = pattern.RewriteRuleSet([NativeTanhGelu.rule()])
