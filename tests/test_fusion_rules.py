"""Each rewrite rule of its own: onnxruntime before and after on the same inputs, and a near miss
that must not fire."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cpm_deploy.optimize.fusions import fast_gelu_bias, native_gelu, tied_head_matmul

RNG = np.random.default_rng(0)


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def apply(model: onnx.ModelProto, rules) -> tuple[onnx.ModelProto, int]:
    m = ir.from_proto(model)
    count = rules.apply_to_model(m)
    return ir.to_proto(m), count


def make(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])


def vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def ops(model):
    return [n.op_type for n in model.graph.node]


def test_fast_gelu_bias():
    bias = numpy_helper.from_array(RNG.standard_normal(8).astype(np.float32), "bias")
    model = make([helper.make_node("Add", ["x", "bias"], ["a"]),
                  helper.make_node("FastGelu", ["a"], ["y"], domain="com.microsoft")],
                 [vi("x", [2, 3, 8])], [vi("y", [2, 3, 8])], [bias])
    feeds = {"x": RNG.standard_normal((2, 3, 8)).astype(np.float32)}
    after, count = apply(model, fast_gelu_bias.rules)
    assert count == 1 and ops(after) == ["FastGelu"] and len(after.graph.node[0].input) == 2
    np.testing.assert_allclose(run(after, feeds)[0], run(model, feeds)[0], atol=1e-6)


def test_fast_gelu_bias_needs_a_constant_bias():
    model = make([helper.make_node("Add", ["x", "b"], ["a"]),
                  helper.make_node("FastGelu", ["a"], ["y"], domain="com.microsoft")],
                 [vi("x", [2, 8]), vi("b", [8])], [vi("y", [2, 8])], [])
    assert apply(model, fast_gelu_bias.rules)[1] == 0


@pytest.mark.parametrize("approximate, fires", [("tanh", 1), ("none", 0)])
def test_native_gelu(approximate, fires):
    model = make([helper.make_node("Gelu", ["x"], ["y"], approximate=approximate)],
                 [vi("x", [4, 8])], [vi("y", [4, 8])], [], opset=20)
    feeds = {"x": (3 * RNG.standard_normal((4, 8))).astype(np.float32)}
    after, count = apply(model, native_gelu.rules)
    assert count == fires
    if fires:
        assert ops(after) == ["FastGelu"]
        np.testing.assert_allclose(run(after, feeds)[0], run(model, feeds)[0], atol=1e-5)


def test_tied_head_to_matmul():
    w = numpy_helper.from_array(RNG.standard_normal((50, 8)).astype(np.float32), "wte")
    model = make([helper.make_node("Gemm", ["x", "wte"], ["y"], transB=1)], [vi("x", [3, 8])], [vi("y", [3, 50])], [w])
    feeds = {"x": RNG.standard_normal((3, 8)).astype(np.float32)}
    after, count = apply(model, tied_head_matmul.rules)
    assert count == 1 and ops(after) == ["MatMul"]
    assert {i.name for i in after.graph.initializer} >= {"wte.T"}
    np.testing.assert_allclose(run(after, feeds)[0], run(model, feeds)[0], atol=1e-5)


def test_tied_head_leaves_a_biased_gemm_alone():
    w = numpy_helper.from_array(np.ones((5, 4), np.float32), "w")
    c = numpy_helper.from_array(np.ones(5, np.float32), "c")
    model = make([helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1)], [vi("x", [2, 4])], [vi("y", [2, 5])], [w, c])
    assert apply(model, tied_head_matmul.rules)[1] == 0
