"""cpm-export: bundle contents, graph hygiene, parity gate, atomic output."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cpm_deploy.cli.export import main as export_cli
from cpm_deploy.exporter import ExportOptions, export_bundle
from cpm_deploy.runtime.bundle.reader import Bundle, BundleError


def test_bundle_manifest_and_checksums(tiny_bundle, tiny_cfg):
    bundle = Bundle.open(tiny_bundle)  # verifies every sha256
    m = bundle.manifest
    assert m["model"]["n_layer"] == tiny_cfg.n_layer and m["special_tokens"]["eod"] == 7
    assert set(m["files"]) == {p.name for p in tiny_bundle.iterdir()} - {"manifest.json"}
    graph = m["graphs"]["decoder"]
    assert graph["precision"] == "fp32" and graph["opset"] == 17
    assert graph["parity"]["passed"] and graph["parity"]["top1_agreement"] == 1.0
    cases = {c["case"] for c in graph["parity"]["cases"]}
    assert {"b1_s17_p0", "b1_s1_p9", "b3_s17_p9", "b3_s1_p9_leftpad"} <= cases
    assert graph["parity"]["logits_max_abs_diff"] < 1e-4
    assert {"torch", "onnx", "onnxruntime", "cpm_deploy"} <= set(m["created_by"])
    assert [i["name"] for i in graph["io"]["inputs"][:4]] == ["input_ids", "attention_mask", "position_ids",
                                                             "past_key_values.0.key"]
    assert graph["io"]["outputs"][1] == {"name": "present.0.key", "dtype": "float32",
                                         "shape": ["batch_size", tiny_cfg.n_head, "total_sequence_length", tiny_cfg.head_dim]}


def test_graph_is_standard_clean_and_external(tiny_bundle):
    model = onnx.load(tiny_bundle / "decoder.onnx", load_external_data=False)
    assert {o.domain for o in model.opset_import} == {""} and model.opset_import[0].version >= 17
    assert all(n.domain == "" for n in model.graph.node)
    assert "LayerNormalization" in {n.op_type for n in model.graph.node}
    big = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {e.value for t in big for e in t.external_data if e.key == "location"} == {"decoder.onnx.data"}
    small = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    for value in small:  # no -inf / float32-min mask constants (they overflow in fp16)
        if value.dtype.kind == "f":
            assert np.all(np.isfinite(value)) and np.all(np.abs(value) < 65504)
    assert json.loads((tiny_bundle / "manifest.json").read_text())["graphs"]["decoder"]["nodes"]["per_layer"] <= 40


def test_dynamic_dims_declared(tiny_bundle):
    model = onnx.load(tiny_bundle / "decoder.onnx", load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["past_key_values.1.value"][2] == "past_sequence_length"


def test_opset_20_uses_native_gelu(tmp_path, tiny_hf):
    from cpm_deploy.exporter import ExportOptions

    m = export_bundle(tiny_hf, tmp_path / "b20", ExportOptions(opset=20))
    model = onnx.load(tmp_path / "b20" / "decoder.onnx", load_external_data=False)
    assert "Gelu" in {n.op_type for n in model.graph.node} and "Tanh" not in {n.op_type for n in model.graph.node}
    assert m["graphs"]["decoder"]["parity"]["passed"]


def test_cli_export_summary(tmp_path, tiny_hf):
    result = CliRunner().invoke(export_cli, [str(tiny_hf), str(tmp_path / "b"), "-q"])
    assert result.exit_code == 0, result.output
    assert "nodes/layer" in result.output and "b1_s17_p0" in result.output
    again = CliRunner().invoke(export_cli, [str(tiny_hf), str(tmp_path / "b"), "-q"])
    assert again.exit_code == 1 and "--overwrite" in again.output
    over = CliRunner().invoke(export_cli, [str(tiny_hf), str(tmp_path / "b"), "-q", "--overwrite"])
    assert over.exit_code == 0
    Bundle.open(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_parity_miss_fails_and_writes_nothing(tmp_path, tiny_hf):
    result = CliRunner().invoke(export_cli, [str(tiny_hf), str(tmp_path / "b"), "-q", "--atol", "0", "--rtol", "0"])
    assert result.exit_code == 1
    assert "parity check failed" in result.output and "no bundle was written" in result.output
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_nothing(tmp_path, tiny_hf, monkeypatch):
    from cpm_deploy.exporter import export as export_mod

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "run_parity", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(tiny_hf, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_user_errors_are_one_line(tmp_path, tiny_hf):
    runner = CliRunner()
    for args, text in [
        ([str(tmp_path / "nope"), str(tmp_path / "b")], "does not exist"),
        ([str(tmp_path), str(tmp_path / "b")], "neither a Hugging Face folder"),
        ([str(tiny_hf), str(tmp_path / "missing-parent" / "b")], "parent folder"),
        ([str(tiny_hf), str(tmp_path / "b"), "--tokenizer", str(tmp_path / "x.model")], "not found"),
    ]:
        result = runner.invoke(export_cli, args + ["-q"])
        assert result.exit_code == 1, (args, result.output)
        assert text in result.output and "Traceback" not in result.output


def test_without_a_tokenizer_the_shipped_vocabulary_is_used(tmp_path, tiny_hf, tiny_cfg):
    import dataclasses
    import shutil

    from cpm_deploy.exporter.checkpoint_tools import write_random_checkpoint

    ck = tmp_path / "no-tok"
    shutil.copytree(tiny_hf, ck)
    (ck / "spiece.model").unlink()
    result = CliRunner().invoke(export_cli, [str(ck), str(tmp_path / "b"), "-q"])
    assert result.exit_code == 0 and "vocabulary shipped with cpm-deploy" in result.output
    assert Bundle.open(tmp_path / "b").manifest["tokenizer"]["file"] == "spiece.model"  # the name HF looks for
    from cpm_deploy.runtime.text.tokenizer import DEFAULT_VOCAB

    assert (tmp_path / "b" / "spiece.model").read_bytes() == DEFAULT_VOCAB.read_bytes()
    # a model whose vocabulary is not CPM's is told to bring its own
    write_random_checkpoint(dataclasses.replace(tiny_cfg, vocab_size=100), tmp_path / "small")
    result = CliRunner().invoke(export_cli, [str(tmp_path / "small"), str(tmp_path / "b2"), "-q"])
    assert result.exit_code == 1 and "--tokenizer" in result.output


def test_corrupt_bundle_is_detected(tmp_path, tiny_bundle):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    data = bytearray((b / "decoder.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (b / "decoder.onnx.data").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch for decoder.onnx.data"):
        Bundle.open(b)
    (b / "decoder.onnx.data").write_bytes(bytes(data[:-1]))
    with pytest.raises(BundleError, match="bytes"):
        Bundle.open(b, verify=False)
    (b / "manifest.json").write_text("{broken")
    with pytest.raises(BundleError, match="corrupt"):
        Bundle.open(b)


def test_generation_graph_shares_the_weights(tiny_bundle, tiny_cfg):
    m = Bundle.open(tiny_bundle).manifest
    full, last = m["graphs"]["decoder"], m["graphs"]["decoder_last"]
    assert (full["logits"], last["logits"]) == ("all", "last")
    assert full["data"] == last["data"] == "decoder.onnx.data"
    assert last["io"]["outputs"][0]["shape"] == ["batch_size", 1, tiny_cfg.vocab_size]
    assert last["parity"]["passed"] and last["parity"]["logits_max_abs_diff"] < 1e-4
    assert sorted(f for f in m["files"] if f.endswith(".data")) == ["decoder.onnx.data"]

    from cpm_deploy.runtime.backends.session import OnnxRuntimeRunner

    feeds = {"input_ids": np.array([[5, 6, 7, 8]], np.int64), "attention_mask": np.ones((1, 4), np.int64),
             "position_ids": np.arange(4, dtype=np.int64)[None]}
    empty = np.zeros((1, tiny_cfg.n_head, 0, tiny_cfg.head_dim), np.float32)
    feeds |= {f"past_key_values.{i}.{k}": empty for i in range(tiny_cfg.n_layer) for k in ("key", "value")}
    a = OnnxRuntimeRunner(tiny_bundle / "decoder.onnx").infer(feeds)["logits"]
    b = OnnxRuntimeRunner(tiny_bundle / "decoder_last.onnx").infer(feeds)["logits"]
    assert a.shape == (1, 4, tiny_cfg.vocab_size) and b.shape == (1, 1, tiny_cfg.vocab_size)
    assert np.allclose(a[:, -1:], b, atol=1e-5)


def test_a_larger_tokenizer_than_the_model_is_refused(tmp_path, tiny_hf, tiny_cfg):
    import dataclasses

    from cpm_deploy.exporter import ConfigError
    from cpm_deploy.exporter.checkpoint_tools import write_random_checkpoint

    small = dataclasses.replace(tiny_cfg, vocab_size=100)
    write_random_checkpoint(small, tmp_path / "ck", tokenizer=tiny_hf / "spiece.model")
    with pytest.raises(ConfigError, match="not this model's tokenizer"):
        export_bundle(tmp_path / "ck", tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_killed_export_leaves_a_folder_the_next_one_removes(tmp_path, tiny_hf):
    import signal
    import subprocess
    import sys

    out = tmp_path / "b"
    code = ("import os, signal; from pathlib import Path; from cpm_deploy.exporter.staging import staged_dir\n"
            f"with staged_dir(Path({str(out)!r})) as tmp:\n"
            "    (tmp / 'decoder.onnx.data').write_bytes(b'x' * 1000)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    stale = list(tmp_path.glob(".b.partial-*"))
    assert len(stale) == 1 and (stale[0] / "decoder.onnx.data").is_file()

    # an export still running (its folder locked) is left alone
    live = subprocess.Popen([sys.executable, "-c", code.replace("os.kill(os.getpid(), signal.SIGKILL)",
                                                               "print('ready', flush=True); input(); raise SystemExit(3)")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert live.stdout.readline().strip() == "ready"
    try:
        export_bundle(tiny_hf, out)
        assert set(tmp_path.glob(".b.partial-*")) - set(stale) and not stale[0].exists()
    finally:
        live.communicate("\n")
    assert live.returncode == 3 and not list(tmp_path.glob(".b.*"))  # the live one cleaned up after itself
    Bundle.open(out)


def test_variants_only_ships_what_was_asked(tmp_path, tiny_hf):
    from cpm_deploy.runtime import CPMGenerator

    result = CliRunner().invoke(export_cli, [str(tiny_hf), str(tmp_path / "b"), "-P", "int4", "--variants-only"])
    assert result.exit_code == 0, result.output
    assert "left out (--variants-only)" in result.output and "holds" in result.output
    m = Bundle.open(tmp_path / "b").manifest
    # cpu-int8 comes along: cpu-int4 runs prompts on it (--no-int4-prefill goes without)
    assert list(m["graphs"]) == ["cpu-int4", "cpu-int8"] and m["default_graph"] == "cpu-int4"
    assert m["left_out"]["decoder"]["parity"]["passed"]
    assert set(m["files"]) == {"decoder_cpu_int4.onnx", "decoder_cpu_int4.onnx.data", "decoder_cpu_int8.onnx",
                               "decoder_cpu_int8.onnx.data", "spiece.model", "tokenizer_config.json",
                               "tokenization_cpm_deploy.py", "config.json",
                               "decoder_cpu_int4_score.onnx", "decoder_cpu_int8_score.onnx"}  # cpm-eval's twins
    assert {p.name for p in (tmp_path / "b").iterdir()} == set(m["files"]) | {"manifest.json"}
    assert CPMGenerator.from_bundle(tmp_path / "b").generate_ids(["清华"], max_new_tokens=2)

    # a variant that reads the fp32 data keeps it; the standard graphs still go
    export_bundle(tiny_hf, tmp_path / "f", ExportOptions(variants=(("cpu", "fp32"),), variants_only=True))
    files = {p.name for p in (tmp_path / "f").iterdir()}
    assert {"decoder_cpu_fp32.onnx", "decoder.onnx.data"} <= files and not files & {"decoder.onnx", "decoder_last.onnx"}


def test_bundle_has_a_gpt2_config_for_hugging_face_tools(tiny_bundle, tiny_cfg):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config.from_pretrained(tiny_bundle)
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.eos_token_id, cfg.bos_token_id) == (
        tiny_cfg.n_layer, tiny_cfg.n_embd, tiny_cfg.vocab_size, 7, 7)
    assert Bundle.open(tiny_bundle).manifest["files"]["config.json"]["bytes"] > 0
