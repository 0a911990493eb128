"""The onnxruntime fusion pipeline: a flat list of passes, each reporting how often it fired.

Input: the exporter's last-position decoder graph (standard ops). Output: per layer one
GroupQueryAttention over a shared KV buffer, FastGelu with its bias, and (for CUDA) two
SkipLayerNormalization. CPU graphs keep Add + LayerNormalization: onnxruntime 1.32's CPU
SkipLayerNormalization is slower than the pair on long inputs and no faster on one row
(docs/design.md).
A pass that must fire and fires fewer times than expected fails the export: a silent
non-fusion is a performance bug that nothing else would catch.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass, ShapeInferencePass
from onnxscript.rewriter.ort_fusions.gelu import fuse_gelu
from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_layer_normalization

from .errors import OptimizeError
from .fusions import fast_gelu_bias, gqa_attention, last_valid_logits, native_gelu, shared_kv


class FusionError(OptimizeError, RuntimeError):
    pass


def fuse_for_ort(model: ir.Model, n_layer: int, skip_layer_norm: bool = True) -> dict[str, int]:
    """Rewrite ``model`` in place; returns {pass: times fired}. Raises FusionError on a miss."""
    # shape-checked fusions first: ONNX shape inference cannot see through the contrib attention op
    ShapeInferencePass()(model)
    counts = {
        "fast_gelu": fuse_gelu(model) + native_gelu.rules.apply_to_model(model),  # opset < 20 / >= 20
        "fast_gelu_bias": fast_gelu_bias.rules.apply_to_model(model),
        "skip_layer_norm": fuse_skip_layer_normalization(model) if skip_layer_norm else 0,
    }
    io = shared_kv.add_inputs(model)
    counts["attention_to_gqa"] = gqa_attention.rules(io).apply_to_model(model)
    counts["last_valid_logits"] = last_valid_logits.rules(io.query_seqlens).apply_to_model(model)
    # per layer: attention, GELU, bias; two Add+LayerNorm pairs (embeddings + ln_2, residual + next ln_1)
    _require(counts, {"fast_gelu": n_layer, "fast_gelu_bias": n_layer, "skip_layer_norm": 2 * n_layer * skip_layer_norm,
                      "attention_to_gqa": n_layer, "last_valid_logits": 1})
    RemoveUnusedNodesPass()(model)  # the attention_mask subgraph is dead now
    for name, value in list(model.graph.initializers.items()):  # constants of the replaced subgraphs
        if not value.uses() and not value.is_graph_output():
            del model.graph.initializers[name]
    shared_kv.finish(model)
    RemoveUnusedOpsetsPass()(model)
    model.opset_imports.setdefault("com.microsoft", 1)
    return counts


def _require(counts: dict[str, int], required: dict[str, int]) -> None:
    missed = {k: f"{counts[k]} of {v}" for k, v in required.items() if counts[k] < v}
    if missed:
        raise FusionError(f"fusion passes fired too rarely: {missed}; the graph no longer has the shape they match")
