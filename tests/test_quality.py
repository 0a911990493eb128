"""Quantization that keeps its quality: a checkpoint whose activations make plain int8/int4 miss the
gate still exports, holding back only the MatMuls that cost the accuracy; the manifest says which."""

import json

import pytest
from click.testing import CliRunner

from cpm_deploy.cli.export import main as export_cli
from cpm_deploy.exporter.quality import Search, _ddmin, fit_to_gate
from cpm_deploy.runtime import CPMGenerator


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
