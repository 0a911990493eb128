"""A bundle, a config.json and a prompt are untrusted input: wrong types, paths leading out of the
folder, graphs that read weights from elsewhere, text sentencepiece cannot take."""

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cpm_deploy.cli.export import main as export_cli
from cpm_deploy.cli.run import main as run_cli
from cpm_deploy.exporter import CheckpointError, ConfigError, load_checkpoint
from cpm_deploy.runtime import Bundle, BundleError, CPMGenerator, GenerationError
from cpm_deploy.runtime.bundle.onnx_external import OnnxFormatError, external_data_locations


@pytest.fixture
def bundle(tmp_path, tiny_bundle):
    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, b)
    return b


def edit_manifest(folder, change):
    m = json.loads((folder / "manifest.json").read_text())
    change(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def run_one_line_error(args):
    result = CliRunner().invoke(run_cli, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1, result.output
    return result.output


@pytest.mark.parametrize("field, value, named", [
    ("model", "x", "field model"),
    ("files", None, "field files"),
    ("graphs", {"decoder": {"file": 3}}, "field graphs.decoder.file"),
    ("model", {"n_layer": "two", "n_embd": 64, "n_head": 4, "vocab_size": 10, "n_positions": 8}, "field model.n_layer"),
    ("tokenizer", {"file": ["spiece.model"]}, "field tokenizer.file"),
])
def test_manifest_with_wrong_types_is_named_in_one_line(bundle, field, value, named):
    edit_manifest(bundle, lambda m: m.__setitem__(field, value))
    with pytest.raises(BundleError, match=named.replace(".", r"\.")):
        Bundle.open(bundle, verify=False)
    assert named in run_one_line_error([str(bundle), "清华", "-n", "2"])


@pytest.mark.parametrize("where, name", [
    ("graph", "../outside.onnx"),
    ("tokenizer", "../../../../etc/passwd"),
    ("graph", "/etc/passwd"),
    ("data", "sub/../../x.data"),
])
def test_paths_leading_out_are_refused_before_anything_is_opened(bundle, where, name):
    def change(m):
        if where == "tokenizer":
            m["tokenizer"]["file"] = name
        else:
            m["graphs"]["decoder_last"]["file" if where == "graph" else "data"] = name
        m["files"][name] = {"bytes": 1, "sha256": "0" * 64}

    edit_manifest(bundle, change)
    with pytest.raises(BundleError, match="relative path|leads out"):
        Bundle.open(bundle, verify=False)
    run_one_line_error([str(bundle), "清华", "-n", "2", "-g", "decoder_last"])


def test_a_file_not_listed_in_the_manifest_is_refused(bundle):
    edit_manifest(bundle, lambda m: m["tokenizer"].__setitem__("file", "vocab-elsewhere.model"))
    with pytest.raises(BundleError, match="tokenizer.file names 'vocab-elsewhere.model', which is not among its files"):
        Bundle.open(bundle, verify=False)


def test_a_symlink_leading_out_is_refused(bundle, tmp_path):
    outside = tmp_path / "outside.model"
    shutil.copyfile(bundle / "spiece.model", outside)
    (bundle / "spiece.model").unlink()
    os.symlink(outside, bundle / "spiece.model")
    with pytest.raises(BundleError, match="spiece.model leads out of the bundle folder"):
        Bundle.open(bundle, verify=False)
    # a symlink that stays inside is fine
    (bundle / "spiece.model").unlink()
    os.rename(outside, bundle / "real.model")
    os.symlink("real.model", bundle / "spiece.model")
    Bundle.open(bundle)


def _point_external_data(graph, location):
    model = onnx.load(str(graph), load_external_data=False)
    for tensor in model.graph.initializer:
        for kv in tensor.external_data:
            if kv.key == "location":
                kv.value = location
    onnx.save(model, str(graph))


@pytest.mark.parametrize("location", ["../outside.data", "/tmp/outside.data", "unlisted.data"])
def test_graph_weights_from_outside_the_manifest_are_refused(bundle, location):
    shutil.copyfile(bundle / "decoder.onnx.data", bundle / "unlisted.data")
    graph = bundle / "decoder_last.onnx"
    _point_external_data(graph, location)
    edit_manifest(bundle, lambda m: m["files"]["decoder_last.onnx"].update(bytes=graph.stat().st_size))
    b = Bundle.open(bundle, verify=False)
    with pytest.raises(BundleError, match=f"reads its weights from '{location}', which is not a file of this bundle"):
        b.graph_files("decoder_last")
    out = run_one_line_error([str(bundle), "清华", "-n", "2", "-g", "decoder_last", "--no-verify"])
    assert "onnxruntime" not in out.lower()


def test_external_data_walk_matches_onnx(tiny_bundle, tmp_path):
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import set_external_data

    for graph in tiny_bundle.glob("*.onnx"):
        model = onnx.load(str(graph), load_external_data=False)
        want = {kv.value for t in model.graph.initializer for kv in t.external_data if kv.key == "location"}
        assert external_data_locations(graph) == want and want
    # tensors in a Constant node inside an If branch, and a sparse initializer, are found too
    const = numpy_helper.from_array(np.ones(300, np.float32), "c")
    set_external_data(const, location="a.bin")
    branch = helper.make_graph([helper.make_node("Constant", [], ["y"], value=const)], "b", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [300])])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    values = numpy_helper.from_array(np.ones(300, np.float32), "sv")
    set_external_data(values, location="b.bin")
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(np.arange(300, dtype=np.int64), "si"), [600])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [300])], sparse_initializer=[sparse])
    path = tmp_path / "nested.onnx"
    onnx.save(helper.make_model(g), str(path))
    assert external_data_locations(path) == {"a.bin", "b.bin"}
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(OnnxFormatError):
        external_data_locations(path)


def test_verification_covers_the_chosen_graph_and_is_recorded(tmp_path, trained_bundle, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    b = tmp_path / "b"
    shutil.copytree(trained_bundle, b)
    bundle = Bundle.open(b, verify=False)
    files = bundle.graph_files("cpu-int4")
    assert files == ["decoder_cpu_int4.onnx", "decoder_cpu_int4.onnx.data", "decoder_cpu_int8.onnx",  # prompts: int8
                     "decoder_cpu_int8.onnx.data", bundle.manifest["tokenizer"]["file"]]
    assert bundle.verify(files) == files  # hashed the first time
    assert bundle.verify(files) == []  # recorded: not again
    CPMGenerator.from_bundle(b, variant="cpu-int4")  # verifies nothing else
    assert Bundle.open(b, verify=False).verify(["decoder.onnx.data"]) == ["decoder.onnx.data"]

    data = b / "decoder_cpu_int4.onnx.data"
    st = data.stat()
    with open(data, "r+b") as f:  # one byte changed, size and mtime put back
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(BundleError, match="checksum mismatch for decoder_cpu_int4.onnx.data"):
        CPMGenerator.from_bundle(b, variant="cpu-int4")
    CPMGenerator.from_bundle(b, variant="decoder_last")  # another graph's files are intact


def test_hf_config_with_wrong_types_is_named(tmp_path, tiny_hf):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_hf, ck)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "n_layer": "two"}))
    with pytest.raises(ConfigError, match="field n_layer"):
        load_checkpoint(ck)
    result = CliRunner().invoke(export_cli, [str(ck), str(tmp_path / "b"), "-q"])
    assert result.exit_code == 1 and "n_layer" in result.output and "Traceback" not in result.output
    (ck / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not an object"):
        load_checkpoint(ck)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd"])
def test_shard_index_naming_files_outside_is_refused(tmp_path, tiny_hf, name):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_hf, ck)
    (ck / "model.safetensors").rename(tmp_path / "outside.safetensors")
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"transformer.wte.weight": name}}))
    with pytest.raises(CheckpointError, match="not a file inside"):
        load_checkpoint(ck)


def test_a_lone_surrogate_is_a_generation_error(trained_generator):
    with pytest.raises(GenerationError, match="lone surrogate"):
        trained_generator("清华\ud800大学", max_new_tokens=2)
