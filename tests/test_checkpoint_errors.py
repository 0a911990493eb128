"""Bad checkpoints: every problem named, nothing written, nothing unpickled."""

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cpm_deploy.exporter import CheckpointError, ConfigError, export_bundle, load_checkpoint


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, tiny_hf):
    ck = _copy(tiny_hf, tmp_path / "bad")
    sd = load_file(ck / "model.safetensors")
    del sd["transformer.h.1.mlp.c_fc.bias"]
    sd["transformer.h.0.attn.extra"] = torch.zeros(3)
    sd["transformer.h.0.ln_1.weight"] = torch.zeros(7)
    save_file(sd, ck / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        export_bundle(ck, tmp_path / "out")
    msg = str(e.value)
    assert "transformer.h.1.mlp.c_fc.bias" in msg and "transformer.h.0.attn.extra" in msg
    assert "transformer.h.0.ln_1.weight has shape [7]" in msg
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_config_disagreeing_with_weights(tmp_path, tiny_hf):
    ck = _copy(tiny_hf, tmp_path / "bad")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["n_layer"] = 3
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing keys: transformer.h.2"):
        load_checkpoint(ck)


def test_untied_head_is_refused(tmp_path, tiny_hf):
    ck = _copy(tiny_hf, tmp_path / "untied")
    sd = load_file(ck / "model.safetensors")
    sd["lm_head.weight"] = sd["transformer.wte.weight"] + 1
    save_file(sd, ck / "model.safetensors")
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        load_checkpoint(ck)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_bin_checkpoints_are_never_unpickled(tmp_path, tiny_hf, monkeypatch):
    ck = tmp_path / "evil"
    ck.mkdir()
    shutil.copy(tiny_hf / "config.json", ck)
    with open(ck / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": _Exploit()}, f)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(ck)
    assert not (tmp_path / "pwned").exists()


def test_corrupt_and_missing_files(tmp_path, tiny_hf):
    ck = _copy(tiny_hf, tmp_path / "corrupt")
    (ck / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read model.safetensors"):
        load_checkpoint(ck)
    (ck / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_checkpoint(ck)
    (ck / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_checkpoint(ck)
    with pytest.raises(CheckpointError, match="neither"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a folder"):
        load_checkpoint(tiny_hf / "config.json")


def test_missing_shard_is_named(tmp_path, tiny_hf):
    ck = _copy(tiny_hf, tmp_path / "sharded")
    (ck / "model.safetensors").rename(ck / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors",
                            "transformer.wpe.weight": "model-00002-of-00002.safetensors"}}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_checkpoint(ck)


def test_random_checkpoints_shard_and_reload(tmp_path, tiny_cfg):
    from cpm_deploy.exporter.checkpoint_tools import write_random_checkpoint

    files = write_random_checkpoint(tiny_cfg, tmp_path / "r", seed=3)
    one = load_checkpoint(tmp_path / "r").model.state_dict()
    from cpm_deploy.exporter.hf_format import save_hf_folder
    from cpm_deploy.exporter.state_dict import random_tensors

    save_hf_folder(tmp_path / "s", tiny_cfg, random_tensors(tiny_cfg, 3), shard_bytes=40_000)
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file() and len(files) == 1
    two = load_checkpoint(tmp_path / "s").model.state_dict()
    assert all(torch.equal(one[k], two[k]) for k in one)
