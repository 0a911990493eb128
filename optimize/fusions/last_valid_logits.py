"""Slice(x, -1) on the sequence axis  =>  each row's last valid position, query_seqlens[b] - 1.

With right-padded prompts the last token of a row is not at S - 1; the head must read the
hidden state where the row ends. GatherND with batch_dims=1 picks one position per row.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern


class LastValidPosition(pattern.RewriteRuleClassBase):
    def __init__(self, query_seqlens: ir.Value):
        super().__init__("last_valid_logits")
        self.query_seqlens = query_seqlens

    def pattern(self, op, x, starts, ends, axes):
        return op.Slice(x, starts, ends, axes)

    def check(self, op, starts, axes, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        s = None if starts.const_value is None else starts.const_value.numpy().tolist()
        a = None if axes.const_value is None else axes.const_value.numpy().tolist()
        if s != [-1] or a != [1]:
            return result.fail(f"not a last-position slice (starts {s}, axes {a})")
        return result

    def rewrite(self, op, x, **_):
        last = op.Sub(self.query_seqlens, op.Constant(value=ir.tensor(np.array(1, np.int32))))  # [B]
        index = op.Unsqueeze(op.Cast(last, to=ir.DataType.INT64), op.Constant(value=ir.tensor(np.array([1], np.int64))))
        picked = op.GatherND(x, index, batch_dims=1)  # [B, H]
        return op.Unsqueeze(picked, op.Constant(value=ir.tensor(np.array([1], np.int64))))  # [B, 1, H]


def rules(query_seqlens: ir.Value) -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([LastValidPosition.rule(query_seqlens)])
