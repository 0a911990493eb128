"""Quantization that keeps its quality: a checkpoint whose activations make plain int8/int4 miss the
gate still exports, holding back only the MatMuls that cost the accuracy; the manifest says which."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from cpm_deploy.cli.export import main as export_cli, variants_table
from cpm_deploy.exporter.quality import Search, _ddmin, fit_to_gate
from cpm_deploy.optimize.quantize import BLOCK_SIZES, quantize_matmuls
from cpm_deploy.runtime import CPMGenerator
from cpm_deploy.runtime.eval.metrics import perplexity


def test_ddmin_finds_exactly_the_sensitive_matmuls():
    names = [f"m{i}" for i in range(13)]
    sensitive = {"m2", "m9", "m12"}
    calls = []

    def passes(held):
        calls.append(held)
        return sensitive <= set(held)

    assert sorted(_ddmin(names, [], passes)) == sorted(sensitive)
    assert len(calls) < len(names) * 2  # far fewer builds than trying each MatMul alone, then pairs


def test_fit_to_gate_takes_the_cheapest_rung_that_works():
    def kl(keep):  # only int8 weights on m1 bring the KL under 0.1
        return 0.05 if keep.get("m1") in ("int8", "fp32") else 1.0

    search = Search(kl, max_kl=0.1)
    assert fit_to_gate("int4", ["m0", "m1", "m2"], search) == {"m1": "int8"}
    assert fit_to_gate("int8", ["m0", "m1"], Search(lambda keep: 1.0, 0.1)) is None


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory, vocab_file):
    """GPT-2 layout, 2 layers, 128 wide, weights ~N(0, 0.3): large activations, as real models have."""
    from cpm_deploy.exporter.config import CPMConfig
    from cpm_deploy.exporter.hf_format import save_hf_folder
    from cpm_deploy.exporter.state_dict import random_tensors

    cfg = CPMConfig(n_layer=2, n_embd=128, n_head=4)
    out = tmp_path_factory.mktemp("wide") / "ckpt"
    save_hf_folder(out, cfg, random_tensors(cfg, seed=0, std=0.3), vocab_file)
    return out


@pytest.mark.parametrize("precision, gate", [("int8", 1e-2), ("int4", 1e-1)])
def test_plain_quantization_misses_and_the_export_holds_back_what_costs_accuracy(wide_checkpoint, tmp_path, precision,
                                                                                 gate):
    plain = CliRunner().invoke(export_cli, [str(wide_checkpoint), str(tmp_path / "plain"), "-P", precision,
                                            "--no-fallback", "-q"])
    assert plain.exit_code == 1 and not (tmp_path / "plain").exists()
    assert "mean KL" in plain.output and "--max-kl" in plain.output and "NO" in plain.output  # the table marks misses
    if precision == "int4":  # its prompt graph is built (and gated) first, and says what it is for
        assert "cpu-int8 (the graph cpu-int4 runs prompts on; --no-int4-prefill" in plain.output

    result = CliRunner().invoke(export_cli, [str(wide_checkpoint), str(tmp_path / "b"), "-P", precision, "-q"])
    assert result.exit_code == 0, result.output
    graph = json.loads((tmp_path / "b" / "manifest.json").read_text())["graphs"][f"cpu-{precision}"]
    held = graph["held_back"]
    assert graph["parity"]["mean_kl"] <= gate < held["plain_mean_kl"]
    assert 0 < len(held["kept"]) < 4 * 2 + 1  # some MatMuls held back, not all
    assert held["data_bytes"] > 0 and held["step_ms"] > 0 and held["builds"] >= 2
    assert CPMGenerator.from_bundle(tmp_path / "b").generate_ids(["清华"], max_new_tokens=3)


def test_when_nothing_helps_the_error_gives_the_numbers_and_the_way_forward(wide_checkpoint, tmp_path):
    result = CliRunner().invoke(export_cli, [str(wide_checkpoint), str(tmp_path / "b"), "-P", "int8", "--max-kl", "1e-15",
                                             "-q"])
    assert result.exit_code == 1 and "reached at best mean KL" in result.output and "--max-kl" in result.output
    assert not (tmp_path / "b").exists()


def chained_matmuls(rng) -> onnx.ModelProto:
    """y = (x @ A) @ B, both weights constant and 256 deep (two blocks of 128)."""
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (256, 256)).astype(np.float32), n) for n in ("A", "B")]
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"], name="a"), helper.make_node("MatMul", ["h", "B"], ["y"], name="b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 256])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_int4_block_size_sets_the_4bit_blocks_and_leaves_the_int8_rung_at_32():
    rng = np.random.default_rng(0)
    x = {"x": rng.normal(0, 1, (4, 256)).astype(np.float32)}
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    want = run(chained_matmuls(np.random.default_rng(1)))
    errors = {}
    for block in (32, 64, 128):
        out, n = quantize_matmuls(chained_matmuls(np.random.default_rng(1)), bits=4, block_size=block, keep={"b": "int8"})
        attrs = {node.name: {a.name: a.i for a in node.attribute} for node in out.graph.node}
        assert n == 2 and (attrs["a_Q4"]["bits"], attrs["a_Q4"]["block_size"]) == (4, block)
        assert (attrs["b_Q8"]["bits"], attrs["b_Q8"]["block_size"]) == (8, 32)
        errors[block] = float(np.sqrt(np.mean((run(out) - want) ** 2)) / np.sqrt(np.mean(want ** 2)))
    assert errors[32] < errors[64] < errors[128] < 0.2, errors  # coarser blocks cost accuracy, in order
    with pytest.raises(ValueError, match="not offered"):
        quantize_matmuls(chained_matmuls(rng), bits=8, block_size=64)


def test_export_int4_with_larger_blocks(trained_hf, tmp_path):
    from conftest import corpus_lines

    asked = ["-P", "int4", "--int4-block-size", "128", "--variants-only", "-q"]
    result = CliRunner().invoke(export_cli, [str(trained_hf), str(tmp_path / "b"), *asked])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    graph = manifest["graphs"]["cpu-int4"]
    assert graph["block_size"] == 128 and graph["parity"]["passed"]
    assert "cpu-int4* (4-bit blocks of 128)" in variants_table(manifest).columns[0]._cells  # the export's table says so
    nodes = onnx.load(str(tmp_path / "b" / graph["file"]), load_external_data=False).graph.node
    assert {next(a.i for a in n.attribute if a.name == "block_size") for n in nodes if n.op_type == "MatMulNBits"} == {128}
    gen = CPMGenerator.from_bundle(tmp_path / "b", variant="cpu-int4", threads=1)
    text = [gen.tokenizer.encode(line) + [gen.tokenizer.eod_id] for line in corpus_lines(30)]
    assert perplexity(gen.decoder, text) < 100  # still the model that learnt these lines

    offered = next(p for p in export_cli.params if p.name == "int4_block_size").type.choices
    assert [int(c) for c in offered] == list(BLOCK_SIZES)  # the CLI offers what the quantizer takes
    wrong = CliRunner().invoke(export_cli, [str(trained_hf), str(tmp_path / "c"), "-P", "int8", "--int4-block-size", "64"])
    assert wrong.exit_code == 2 and "add -P int4" in wrong.output and not (tmp_path / "c").exists()
