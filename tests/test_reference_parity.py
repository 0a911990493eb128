"""The reference model against Hugging Face transformers' GPT2LMHeadModel on the same weights."""

import pytest
import torch

from cpm_deploy.exporter import load_checkpoint
from cpm_deploy.exporter.model import greedy_generate

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_model(tiny_hf):
    # the folder was written by cpm-checkpoint: transformers loading it proves the format too
    return transformers.GPT2LMHeadModel.from_pretrained(tiny_hf).eval()


def test_logits_match_transformers(tiny_hf, hf_model):
    ours = load_checkpoint(tiny_hf).model
    ids = torch.randint(0, ours.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(ids).logits
        got, _ = ours(ids)
    assert (got - ref).abs().max() <= 1e-4


def test_past_key_values_match_transformers(tiny_hf, hf_model):
    ours = load_checkpoint(tiny_hf).model
    ids = torch.randint(0, ours.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hf_first = hf_model(ids[:, :8], use_cache=True)
        hf_next = hf_model(ids[:, 8:], past_key_values=hf_first.past_key_values)
        _, past = ours(ids[:, :8])
        got, presents = ours(ids[:, 8:], past=past)
    assert (got - hf_next.logits).abs().max() <= 1e-4
    assert presents[0][0].shape == (1, ours.config.n_head, 12, ours.config.head_dim)


def test_greedy_matches_transformers_generate(tiny_hf, hf_model):
    ours = load_checkpoint(tiny_hf).model
    prompt = [11, 12, 13, 14]
    ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert greedy_generate(ours, prompt, 12) == ref


@pytest.mark.parametrize("weights", ["safetensors", "bin", "sharded"])
def test_loads_checkpoints_saved_by_transformers(tmp_path, hf_model, weights):
    out = tmp_path / "saved"
    if weights == "bin":  # transformers 5 no longer writes .bin; it was always torch.save of the state dict
        hf_model.config.save_pretrained(out)
        torch.save(hf_model.state_dict(), out / "pytorch_model.bin")
    else:
        hf_model.save_pretrained(out, **({"max_shard_size": "100KB"} if weights == "sharded" else {}))
    if weights == "sharded":
        assert (out / "model.safetensors.index.json").is_file()
    model = load_checkpoint(out).model
    ids = torch.arange(10)[None] + 20
    with torch.no_grad():
        assert (model(ids)[0] - hf_model(ids).logits).abs().max() <= 1e-4
