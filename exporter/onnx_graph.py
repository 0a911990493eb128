"""Builds the CPM decoder as a standard-op ONNX graph with past key values.

The graph is written node by node rather than traced: about 26 nodes per layer (9 more where GELU
is spelled out for opset < 20), no shape-computation sprawl, HF GPT-2 I/O names, weights streamed
into one external data file. The attention mask is built once for all layers with a finite fill
value (fp16-safe), and the tied head is a Gemm with transB on the embedding (no second copy).
With ``last_logits_only`` the head runs on the last position alone (logits [B, 1, V]): what
generation needs, and a 512-token prefill skips a 512 x vocab matrix product.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from .config import CPMConfig
from .external_data import ExternalDataWriter
from .model import MASK_VALUE

MIN_OPSET, MAX_OPSET = 17, 21
DIMS = {"B": "batch_size", "S": "sequence_length", "P": "past_sequence_length", "T": "total_sequence_length"}


def io_spec(cfg: CPMConfig, last_logits_only: bool = False) -> tuple[list, list]:
    """(inputs, outputs) as (name, elem_type, symbolic shape) triples, HF ONNX naming for GPT-2."""
    nh, hd = cfg.n_head, cfg.head_dim
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [("input_ids", i64, ["B", "S"]), ("attention_mask", i64, ["B", "T"]), ("position_ids", i64, ["B", "S"])]
    outputs = [("logits", f32, ["B", 1 if last_logits_only else "S", cfg.vocab_size])]
    for i in range(cfg.n_layer):
        for kind in ("key", "value"):
            inputs.append((f"past_key_values.{i}.{kind}", f32, ["B", nh, "P", hd]))
            outputs.append((f"present.{i}.{kind}", f32, ["B", nh, "T", hd]))
    return inputs, outputs


class _Graph:
    def __init__(self, writer: ExternalDataWriter):
        self.writer, self.nodes, self.initializers, self.value_info = writer, [], [], []
        self.scope = ""

    def op(self, op_type: str, *inputs: str, name: str, outputs: int = 1, **attrs):
        full = f"{self.scope}/{name}"
        outs = [f"{full}/out{k}" if outputs > 1 else f"{full}/out" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=full, **attrs))
        return outs if outputs > 1 else outs[0]

    def annotate(self, name: str, elem_type: int, dims: list) -> str:
        """Declare a shape that inference cannot derive (Range has a data-dependent length)."""
        self.value_info.append(helper.make_tensor_value_info(name, elem_type, [DIMS.get(d, d) for d in dims]))
        return name

    def const(self, name: str, value) -> str:
        """Small constants live inside the graph file."""
        self.initializers.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.writer.add(name, array))
        return name


def _gelu_tanh(g: _Graph, x: str, opset: int) -> str:
    if opset >= 20:
        return g.op("Gelu", x, name="gelu", approximate="tanh")
    # x * (0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))), operand for operand the shape that
    # onnxscript's GeluTanhFusion (and onnxruntime's FastGeluFusion) recognise
    inner = g.op("Add", x, g.op("Mul", "c/gelu_a", g.op("Pow", x, "c/three", name="gelu/pow"), name="gelu/mul_a"), name="gelu/add")
    t = g.op("Tanh", g.op("Mul", "c/gelu_b", inner, name="gelu/mul_b"), name="gelu/tanh")
    half = g.op("Mul", "c/half", g.op("Add", t, "c/one", name="gelu/one_plus"), name="gelu/half")
    return g.op("Mul", x, half, name="gelu/out")


def build_decoder(
    cfg: CPMConfig,
    weight: Callable[[str], np.ndarray],
    writer: ExternalDataWriter,
    opset: int = 17,
    on_layer: Callable[[int], None] | None = None,
    last_logits_only: bool = False,
) -> onnx.ModelProto:
    """``weight(name)`` returns the fp32 array of a HF-named parameter, Conv1D layout [in, out]."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset} unsupported; use {MIN_OPSET}..{MAX_OPSET}")
    H, nh, hd, V = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.vocab_size
    g = _Graph(writer)
    f32 = np.float32
    g.const("c/qkv_shape", np.array([0, 0, 3 * nh, hd], np.int64))
    g.const("c/split3", np.array([nh, nh, nh], np.int64))
    g.const("c/merge_shape", np.array([0, 0, H], np.int64))
    g.const("c/flat_shape", np.array([-1, H], np.int64))
    g.const("c/vocab", np.array([V], np.int64))
    if last_logits_only:
        g.const("c/one_vocab", np.array([1, V], np.int64))
        g.const("c/last", np.array([-1], np.int64))
        g.const("c/end", np.array([np.iinfo(np.int64).max], np.int64))
    g.const("c/scale", f32(1.0 / math.sqrt(hd)))
    g.const("c/mask_value", f32(MASK_VALUE))
    g.const("c/zero", np.int64(0))
    g.const("c/one_i", np.int64(1))
    g.const("c/axes_1", np.array([1], np.int64))
    g.const("c/axes_12", np.array([1, 2], np.int64))
    if opset < 20:
        for name, v in (("three", 3.0), ("gelu_a", 0.044715), ("gelu_b", math.sqrt(2 / math.pi)), ("half", 0.5), ("one", 1.0)):
            g.const(f"c/{name}", f32(v))

    # attention mask for all layers: causal over absolute positions AND the padding mask
    g.scope = "/mask"
    S = g.op("Shape", "input_ids", name="seq", start=1, end=2)
    T = g.op("Shape", "attention_mask", name="total", start=1, end=2)
    P = g.op("Squeeze", g.op("Sub", T, S, name="past"), name="past_scalar")
    T0 = g.op("Squeeze", T, name="total_scalar")
    q_pos = g.op("Unsqueeze", g.op("Range", P, T0, "c/one_i", name="q_pos"), "c/axes_1", name="q_col")  # [S, 1]
    k_pos = g.op("Range", "c/zero", T0, "c/one_i", name="k_pos")  # [T]
    causal = g.annotate(g.op("LessOrEqual", k_pos, q_pos, name="causal"), TensorProto.BOOL, ["S", "T"])
    pad = g.op("Unsqueeze", g.op("Cast", "attention_mask", name="pad", to=TensorProto.BOOL), "c/axes_12", name="pad4")
    mask = g.annotate(g.op("And", causal, pad, name="mask"), TensorProto.BOOL, ["B", 1, "S", "T"])

    g.scope = "/embed"
    tok = g.op("Gather", g.weight("transformer.wte.weight", weight("transformer.wte.weight")), "input_ids", name="wte")
    pos = g.op("Gather", g.weight("transformer.wpe.weight", weight("transformer.wpe.weight")), "position_ids", name="wpe")
    x = g.op("Add", tok, pos, name="sum")  # [B, S, H]

    eps = cfg.layer_norm_epsilon
    for i in range(cfg.n_layer):
        g.scope, p = f"/h.{i}", f"transformer.h.{i}."

        def w(suffix, p=p):
            return g.weight(p + suffix, weight(p + suffix))

        def linear(inp, mod, name):
            matmul = g.op("MatMul", inp, w(mod + ".weight"), name=name + "/matmul")
            return g.op("Add", matmul, w(mod + ".bias"), name=name + "/bias")

        h = g.op("LayerNormalization", x, w("ln_1.weight"), w("ln_1.bias"), name="ln_1", axis=-1, epsilon=eps)
        qkv = g.op("Reshape", linear(h, "attn.c_attn", "qkv"), "c/qkv_shape", name="qkv/heads")  # [B, S, 3nh, hd]
        qkv = g.op("Transpose", qkv, name="qkv/transpose", perm=[0, 2, 1, 3])  # [B, 3nh, S, hd]
        q, k, v = g.op("Split", qkv, "c/split3", name="qkv/split", outputs=3, axis=1)  # 3 x [B, nh, S, hd]
        present_k = f"present.{i}.key"
        present_v = f"present.{i}.value"
        g.nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.key", k], [present_k], name=f"/h.{i}/present_k", axis=2))
        g.nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.value", v], [present_v], name=f"/h.{i}/present_v", axis=2))
        kt = g.op("Transpose", present_k, name="k_t", perm=[0, 1, 3, 2])  # [B, nh, hd, T]
        scores = g.op("MatMul", g.op("Mul", q, "c/scale", name="q_scale"), kt, name="scores")  # [B, nh, S, T]
        scores = g.op("Where", mask, scores, "c/mask_value", name="masked")
        probs = g.op("Softmax", scores, name="softmax", axis=-1)
        ctx = g.op("Transpose", g.op("MatMul", probs, present_v, name="ctx"), name="ctx/transpose", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", ctx, "c/merge_shape", name="ctx/merge")  # [B, S, H]
        x = g.op("Add", x, linear(ctx, "attn.c_proj", "attn_out"), name="residual_1")
        h = g.op("LayerNormalization", x, w("ln_2.weight"), w("ln_2.bias"), name="ln_2", axis=-1, epsilon=eps)
        h = _gelu_tanh(g, linear(h, "mlp.c_fc", "fc"), opset)
        x = g.op("Add", x, linear(h, "mlp.c_proj", "mlp_out"), name="residual_2")
        if on_layer:
            on_layer(i)

    g.scope = "/head"
    if last_logits_only:
        x = g.op("Slice", x, "c/last", "c/end", "c/axes_1", name="last_position")  # [B, 1, H]
    x = g.op("LayerNormalization", x, g.weight("transformer.ln_f.weight", weight("transformer.ln_f.weight")),
             g.weight("transformer.ln_f.bias", weight("transformer.ln_f.bias")), name="ln_f", axis=-1, epsilon=eps)
    flat = g.op("Reshape", x, "c/flat_shape", name="flatten")  # [B*S, H]
    logits = g.op("Gemm", flat, "transformer.wte.weight", name="tied_head", transB=1)  # [B*S, V]
    if last_logits_only:
        batch = g.op("Shape", "input_ids", name="batch", start=0, end=1)
        out_shape = g.op("Concat", batch, "c/one_vocab", name="logits_shape", axis=0)
    else:
        out_shape = g.op("Concat", g.op("Shape", "input_ids", name="batch_seq"), "c/vocab", name="logits_shape", axis=0)
    g.nodes.append(helper.make_node("Reshape", [logits, out_shape], ["logits"], name="/head/logits"))

    inputs, outputs = io_spec(cfg, last_logits_only)

    def vi(name, dtype, shape):
        return helper.make_tensor_value_info(name, dtype, [DIMS.get(d, d) for d in shape])

    graph = helper.make_graph(g.nodes, "cpm_decoder", [vi(*s) for s in inputs], [vi(*s) for s in outputs], g.initializers,
                              value_info=g.value_info)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="cpm-deploy",
                              ir_version=helper.find_min_ir_version_for(opsets))
    return model


def nodes_per_layer(model: onnx.ModelProto) -> dict:
    layers: dict[str, int] = {}
    for node in model.graph.node:
        scope = node.name.split("/")[1] if node.name.startswith("/") else "?"
        layers[scope] = layers.get(scope, 0) + 1
    per_layer = [n for s, n in layers.items() if s.startswith("h.")]
    return {"total": len(model.graph.node), "per_layer": max(per_layer, default=0),
            "outside_layers": len(model.graph.node) - sum(per_layer),
            "constant_nodes": sum(n.op_type == "Constant" for n in model.graph.node)}
