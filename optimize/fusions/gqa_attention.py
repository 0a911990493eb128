"""The exporter's attention block  =>  com.microsoft.GroupQueryAttention with a shared KV buffer.

Matched (per layer, from exporter/onnx_graph.py):
    Reshape(qkv) -> Transpose -> Split(q, k, v); present = Concat(past, k|v);
    Softmax(Where(mask, Mul(q, scale) @ Transpose(present_k))) @ present_v -> Transpose -> Reshape
GroupQueryAttention takes the packed qkv as it leaves the c_attn bias Add, applies the causal
mask and per-row lengths itself, and appends k/v in place into the max-length buffers.
"""

from __future__ import annotations

import math

import numpy as np
from onnxscript.rewriter import pattern

from .shared_kv import SharedKVInputs


def _const(value) -> np.ndarray | None:
    return None if value.const_value is None else value.const_value.numpy()


class AttentionToGQA(pattern.RewriteRuleClassBase):
    def __init__(self, io: SharedKVInputs):
        super().__init__("attention_to_gqa")
        self.io = io

    def pattern(self, op, qkv, qkv_shape, split_sizes, past_key, past_value, scale, mask, fill, merge_shape):
        heads = op.Transpose(op.Reshape(qkv, qkv_shape), perm=[0, 2, 1, 3])  # [B, 3nh, S, hd]
        q, k, v = op.Split(heads, split_sizes, axis=1, _outputs=3)
        present_key = op.Concat(past_key, k, axis=2)
        present_value = op.Concat(past_value, v, axis=2)
        scores = op.MatMul(op.Mul(q, scale), op.Transpose(present_key, perm=[0, 1, 3, 2]))
        probs = op.Softmax(op.Where(mask, scores, fill), axis=-1)
        ctx = op.Transpose(op.MatMul(probs, present_value), perm=[0, 2, 1, 3])
        return op.Reshape(ctx, merge_shape), present_key, present_value

    def check(self, op, qkv_shape, split_sizes, scale, merge_shape, past_key, past_value, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        shape, splits, s, merge = (_const(v) for v in (qkv_shape, split_sizes, scale, merge_shape))
        if shape is None or splits is None or s is None or merge is None:
            return result.fail("shapes, splits and scale must be constants")
        if len(shape) != 4 or list(shape[:2]) != [0, 0] or len(set(splits.tolist())) != 1:
            return result.fail(f"unexpected head layout {shape.tolist()} / {splits.tolist()}")
        nh, hd = int(splits[0]), int(shape[3])
        if int(shape[2]) != 3 * nh or merge.tolist() != [0, 0, nh * hd]:
            return result.fail("qkv and merge shapes disagree")
        if hd % 8:
            return result.fail(f"GroupQueryAttention needs head_dim % 8 == 0, got {hd}")
        if not math.isclose(float(s), 1 / math.sqrt(hd), rel_tol=1e-6):
            return result.fail(f"scale {float(s)} is not 1/sqrt({hd})")
        if not (past_key.is_graph_input() and past_value.is_graph_input()):
            return result.fail("past key/value must be graph inputs")
        return result

    def rewrite(self, op, qkv, qkv_shape, past_key, past_value, **_):
        _, _, three_nh, hd = _const(qkv_shape).tolist()
        nh = three_nh // 3
        io = self.io
        return op.GroupQueryAttention(
            qkv, None, None, past_key, past_value, io.seqlens_k, io.total_sequence_length,
            None, None, None, None, None, None, None, None, None, io.query_seqlens,
            num_heads=nh, kv_num_heads=nh, scale=1 / math.sqrt(hd), _domain="com.microsoft", _outputs=3,
        )


def rules(io: SharedKVInputs) -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([AttentionToGQA.rule(io)])
