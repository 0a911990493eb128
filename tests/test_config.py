import dataclasses
import logging

import pytest

from cpm_deploy.exporter.config import PRESETS, CPMConfig, ConfigError


def test_presets_match_cpm_sizes():
    large = PRESETS["large"]
    assert (large.n_layer, large.n_embd, large.n_head, large.head_dim) == (32, 2560, 32, 80)
    assert 2.5e9 < large.n_params < 2.7e9
    assert (PRESETS["small"].n_layer, PRESETS["medium"].n_embd) == (12, 1024)
    assert all(p.vocab_size == 30000 and p.n_positions == 1024 and p.eod_id == 7 for p in PRESETS.values())


def test_config_is_frozen_and_validated():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["small"].n_layer = 3
    with pytest.raises(ConfigError, match="not divisible"):
        CPMConfig(n_embd=100, n_head=12)
    with pytest.raises(ConfigError, match="unknown preset"):
        CPMConfig.from_preset("xl")


def test_hf_config_round_trip():
    cfg = PRESETS["medium"]
    assert CPMConfig.from_hf_config(cfg.to_hf_config()) == cfg


def test_out_of_vocabulary_special_ids_warn(caplog):
    d = PRESETS["small"].to_hf_config() | {"bos_token_id": 50256, "eos_token_id": 50256}
    with caplog.at_level(logging.WARNING, logger="cpm_deploy"):
        cfg = CPMConfig.from_hf_config(d)
    assert cfg.eod_id == 7
    assert "eos_token_id=50256" in caplog.text and "bos_token_id=50256" in caplog.text


@pytest.mark.parametrize("change, message", [
    ({"activation_function": "relu"}, "activation_function"),
    ({"n_inner": 1000}, "n_inner"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
])
def test_unsupported_architecture_is_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        CPMConfig.from_hf_config(PRESETS["small"].to_hf_config() | change)
