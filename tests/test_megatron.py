"""The original model-parallel format: a known model split by the test itself, merged back by the loader.

The split follows the Megatron-LM layout the original training code used; a partition-wise
forward (each partition computing its own heads, row-parallel outputs summed) checks that the
layout, not just the round trip, is right, bias order included.
"""

import argparse
import math
import pickle
import random
import types

import numpy as np

import pytest
import torch
from click.testing import CliRunner

from cpm_deploy.cli.checkpoint import main as checkpoint_cli
from cpm_deploy.exporter import CheckpointError, load_checkpoint

N_PARTS = 2


def split_to_megatron(model, n: int) -> list[dict]:
    """Write a model as Megatron partitions (torch Linear [out, in] layout)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    H = model.config.n_embd
    parts = [{} for _ in range(n)]
    for r in range(n):
        parts[r]["word_embeddings.weight"] = sd["transformer.wte.weight"].chunk(n, 0)[r].clone()
        parts[r]["position_embeddings.weight"] = sd["transformer.wpe.weight"]
        parts[r]["transformer.final_layernorm.weight"] = sd["transformer.ln_f.weight"]
        parts[r]["transformer.final_layernorm.bias"] = sd["transformer.ln_f.bias"]
    for i in range(model.config.n_layer):
        h, L = f"transformer.h.{i}.", f"transformer.layers.{i}."
        w_qkv = sd[h + "attn.c_attn.weight"].t()  # [3H, H], rows Q | K | V
        b_qkv = sd[h + "attn.c_attn.bias"]
        for r in range(n):
            rows = lambda t, j: t[j * H:(j + 1) * H].chunk(n, 0)[r]  # noqa: E731 - rows of Q/K/V for partition r
            p = parts[r]
            p[L + "input_layernorm.weight"], p[L + "input_layernorm.bias"] = sd[h + "ln_1.weight"], sd[h + "ln_1.bias"]
            p[L + "post_attention_layernorm.weight"] = sd[h + "ln_2.weight"]
            p[L + "post_attention_layernorm.bias"] = sd[h + "ln_2.bias"]
            p[L + "attention.query_key_value.weight"] = torch.cat([rows(w_qkv, j) for j in range(3)]).clone()
            p[L + "attention.query_key_value.bias"] = torch.cat([rows(b_qkv, j) for j in range(3)]).clone()
            p[L + "attention.dense.weight"] = sd[h + "attn.c_proj.weight"].t().chunk(n, 1)[r].clone()
            p[L + "attention.dense.bias"] = sd[h + "attn.c_proj.bias"]
            p[L + "mlp.dense_h_to_4h.weight"] = sd[h + "mlp.c_fc.weight"].t().chunk(n, 0)[r].clone()
            p[L + "mlp.dense_h_to_4h.bias"] = sd[h + "mlp.c_fc.bias"].chunk(n, 0)[r].clone()
            p[L + "mlp.dense_4h_to_h.weight"] = sd[h + "mlp.c_proj.weight"].t().chunk(n, 1)[r].clone()
            p[L + "mlp.dense_4h_to_h.bias"] = sd[h + "mlp.c_proj.bias"]
    return parts


def training_state(n_parts: int, n_heads: int, iteration: int) -> dict:
    """What Megatron's save_checkpoint hands DeepSpeed as client state, plus DeepSpeed's own fields."""
    return {
        "iteration": iteration,
        "args": argparse.Namespace(num_attention_heads=n_heads, model_parallel_size=n_parts, hidden_size=0,
                                   lr=1.5e-4, fp16=True, deepspeed_config="ds_config.json"),
        "random_rng_state": random.getstate(),  # tuples of ints
        "np_rng_state": np.random.get_state(),  # ('MT19937', uint32 array, int, int, float)
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.get_rng_state(),
        "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()},
        "optimizer": None,
        "lr_scheduler": {"start_lr": 1.5e-4, "warmup_iter": 3200, "num_iters": iteration, "decay_style": "cosine",
                         "end_iter": 320000, "min_lr": np.float64(1e-5)},
        "buffer_names": [],
        "csr_tensor_module_names": set(),
        "skipped_steps": 3,
        "global_steps": iteration,
        "global_samples": iteration * 8,
        "dp_world_size": 4,
        "mp_world_size": n_parts,
        "ds_config": {"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True}},
        "ds_version": "0.3.0",
    }


class Numpy1Pickler(pickle._Pickler):
    """Spells numpy's globals as numpy 1.x did (numpy.core.*), as the 2020 checkpoints have them."""

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "") or ""
        if not module.startswith("numpy._core"):
            return super().save_global(obj, name)
        module = module.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def save_megatron(folder, parts, n_heads, iteration="1000", numpy1=False):
    """Partitions as the training code wrote them: weights under 'module' beside the training state."""
    folder.mkdir(parents=True)
    (folder / "latest_checkpointed_iteration.txt").write_text(iteration)
    (folder / iteration).mkdir()
    pickler = {"pickle_module": types.SimpleNamespace(Pickler=Numpy1Pickler, __name__="pickle")} if numpy1 else {}
    for r, p in enumerate(parts):
        torch.save({"module": p, **training_state(len(parts), n_heads, int(iteration))},
                   folder / iteration / f"mp_rank_{r:02d}_model_states.pt", **pickler)
    return folder


@pytest.fixture(scope="module")
def parts(tiny_model):
    return split_to_megatron(tiny_model, N_PARTS)


@pytest.fixture(scope="module")
def megatron_dir(tmp_path_factory, parts, tiny_model, vocab_file):
    folder = save_megatron(tmp_path_factory.mktemp("mp") / "CPM-Generate", parts, tiny_model.config.n_head)
    (folder / "chinese_vocab.model").write_bytes(vocab_file.read_bytes())
    return folder


def test_merge_restores_every_weight(megatron_dir, tiny_model):
    ckpt = load_checkpoint(megatron_dir)
    assert ckpt.format == "cpm-original" and ckpt.config == tiny_model.config
    want, got = tiny_model.state_dict(), ckpt.model.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert ckpt.tokenizer.name == "chinese_vocab.model"


def _partitioned_attention(parts, layer, x, n_heads):
    """Megatron's forward: each partition attends with its own heads, dense outputs are summed."""
    L, out = f"transformer.layers.{layer}.", 0
    B, S, _ = x.shape
    heads = n_heads // len(parts)
    for p in parts:
        mixed = x @ p[L + "attention.query_key_value.weight"].t() + p[L + "attention.query_key_value.bias"]
        q, k, v = (t.view(B, S, heads, -1).transpose(1, 2) for t in mixed.chunk(3, dim=-1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), -1e4)
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, -1)
        out = out + ctx @ p[L + "attention.dense.weight"].t()
    return out + parts[0][L + "attention.dense.bias"]


def _partitioned_mlp(parts, layer, x):
    from cpm_deploy.exporter.model import gelu_new

    L = f"transformer.layers.{layer}."
    out = sum(gelu_new(x @ p[L + "mlp.dense_h_to_4h.weight"].t() + p[L + "mlp.dense_h_to_4h.bias"])
              @ p[L + "mlp.dense_4h_to_h.weight"].t() for p in parts)
    return out + parts[0][L + "mlp.dense_4h_to_h.bias"]


def test_partitioned_forward_equals_merged_model(megatron_dir, parts):
    model = load_checkpoint(megatron_dir).model
    block = model.transformer.h[1]
    x = torch.randn(2, 7, model.config.n_embd, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        merged_attn, _ = block.attn(x, mask, None)
        merged_mlp = block.mlp(x)
    assert torch.allclose(merged_attn, _partitioned_attention(parts, 1, x, model.config.n_head), atol=1e-5)
    assert torch.allclose(merged_mlp, _partitioned_mlp(parts, 1, x), atol=1e-5)


def test_naive_bias_concatenation_differs(parts, megatron_dir, tiny_model):
    """The bug of a widely copied converter: the bias concatenated as stored, not regrouped."""
    key = "transformer.layers.0.attention.query_key_value.bias"
    merged_naively = torch.cat([p[key] for p in parts])
    good = load_checkpoint(megatron_dir).model.state_dict()["transformer.h.0.attn.c_attn.bias"]
    assert not torch.equal(merged_naively, good)
    assert torch.equal(good, tiny_model.state_dict()["transformer.h.0.attn.c_attn.bias"])


def test_missing_partition_and_iteration_file(tmp_path, parts, tiny_model):
    folder = save_megatron(tmp_path / "ck", parts, tiny_model.config.n_head)
    (folder / "1000" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt"):
        load_checkpoint(folder)
    (folder / "1000" / "mp_rank_01_model_states.pt").rename(folder / "1000" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="saved with 2 partitions but 1 are present"):
        load_checkpoint(folder)
    (folder / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration.txt is missing"):
        load_checkpoint(folder)


def test_wrong_iteration_named(tmp_path, parts, tiny_model):
    folder = save_megatron(tmp_path / "ck", parts, tiny_model.config.n_head)
    (folder / "latest_checkpointed_iteration.txt").write_text("2000\n")
    with pytest.raises(CheckpointError, match="says '2000'"):
        load_checkpoint(folder)


class Sneaky:
    pass


def test_unknown_pickled_objects_are_refused(tmp_path, parts):
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "latest_checkpointed_iteration.txt").write_text("5")
    (folder / "5").mkdir()
    torch.save({"module": parts[0], "extra": Sneaky()}, folder / "5" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="Sneaky"):
        load_checkpoint(folder)


def test_numpy1_training_state_loads_and_object_arrays_do_not(tmp_path, parts, tiny_model):
    folder = save_megatron(tmp_path / "old", parts, tiny_model.config.n_head, numpy1=True)
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(folder / "1000" / "mp_rank_00_model_states.pt"))
    assert "numpy.core.multiarray._reconstruct" in names  # really the numpy 1.x spelling
    ckpt = load_checkpoint(folder)
    assert all(torch.equal(v, ckpt.model.state_dict()[k]) for k, v in tiny_model.state_dict().items())

    hostile = tmp_path / "objarray"
    save_megatron(hostile, parts, tiny_model.config.n_head)
    obj = torch.load(hostile / "1000" / "mp_rank_00_model_states.pt", weights_only=False)
    obj["np_rng_state"] = np.array([print, "x"], dtype=object)  # data dtype 'O' carries arbitrary objects
    torch.save(obj, hostile / "1000" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="ObjectDType|builtins.print"):
        load_checkpoint(hostile)


def test_convert_cli_writes_a_folder_transformers_loads(megatron_dir, tmp_path, tiny_model):
    out = tmp_path / "hf"
    result = CliRunner().invoke(checkpoint_cli, ["convert", str(megatron_dir), str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "spiece.model").is_file()
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.arange(12)[None] + 30
    with torch.no_grad():
        assert (hf(ids).logits - tiny_model(ids)[0]).abs().max() <= 1e-4
    again = CliRunner().invoke(checkpoint_cli, ["convert", str(megatron_dir), str(out)])
    assert again.exit_code == 1 and "already exists" in again.output


def test_export_straight_from_the_original_format(megatron_dir, tmp_path):
    from cpm_deploy.exporter import export_bundle
    from cpm_deploy.runtime import Bundle

    m = export_bundle(megatron_dir, tmp_path / "bundle")
    assert m["source"]["format"] == "cpm-original"
    assert m["graphs"]["decoder"]["parity"]["passed"] and m["graphs"]["cpu-fp32"]["parity"]["passed"]
    assert m["tokenizer"]["file"] == "spiece.model"  # the release's chinese_vocab.model, under Hugging Face's name
    assert (tmp_path / "bundle" / "spiece.model").read_bytes() == (megatron_dir / "chinese_vocab.model").read_bytes()
    Bundle.open(tmp_path / "bundle")
