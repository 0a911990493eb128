"""Fixtures: CPM's real vocabulary (shipped in the package), real Chinese headlines when
../shared is there (else a few sentences written here), tiny checkpoints written by the real tools."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpm_deploy.runtime.text.tokenizer import DEFAULT_VOCAB

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REAL_VOCAB = DEFAULT_VOCAB
OLD_VOCAB = SHARED / "cpm-vocab" / "chinese_vocab.before-2020-11-22.model"
CORPUS = SHARED / "corpus" / "tnews-headlines.txt"

needs_corpus = pytest.mark.skipif(not CORPUS.is_file(), reason="needs ../shared/corpus (real Chinese text)")

# Used only without ../shared: a little Chinese text for the briefly trained model.
FALLBACK_TEXT = """清华大学是中国著名的高等学府，位于北京市海淀区。
今天天气很好，我们一起去公园散步吧。
人工智能技术正在改变我们的生活和工作方式。
中国足球队在比赛中取得了胜利，球迷们非常高兴。
新的手机发布会将在下周举行，价格还没有公布。
这本书讲述了一个关于友谊和成长的故事。
股市今天大幅上涨，投资者信心明显增强。
春节期间，很多人回家和家人团聚。
科学家发现了一种新的治疗方法，可以帮助病人更快康复。
学校组织学生参加了植树活动，大家都很积极。
"""


def corpus_lines(n: int | None = None) -> list[str]:
    lines = CORPUS.read_text(encoding="utf-8").splitlines() if CORPUS.is_file() else FALLBACK_TEXT.splitlines() * 20
    lines = [line for line in lines if line.strip()]
    return lines[:n] if n else lines


@pytest.fixture(scope="session")
def vocab_file() -> Path:
    return DEFAULT_VOCAB


@pytest.fixture(scope="session")
def vocab_size(vocab_file) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(vocab_file)).get_piece_size()


@pytest.fixture(scope="session")
def tiny_cfg(vocab_size):
    from cpm_deploy.exporter.config import PRESETS
    import dataclasses

    return dataclasses.replace(PRESETS["tiny"], vocab_size=vocab_size)


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    from cpm_deploy.exporter.state_dict import build_model, random_tensors

    return build_model(dict(random_tensors(tiny_cfg, seed=0)), tiny_cfg)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tiny_cfg, vocab_file) -> Path:
    """A random tiny checkpoint in Hugging Face format, written by cpm-checkpoint's code (safetensors)."""
    from cpm_deploy.exporter.checkpoint_tools import write_random_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny-hf"
    write_random_checkpoint(tiny_cfg, out, seed=0, tokenizer=vocab_file)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_hf) -> Path:
    from cpm_deploy.exporter import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny-bundle"
    export_bundle(tiny_hf, out)
    return out


@pytest.fixture(scope="session")
def trained_hf(pytestconfig, vocab_file) -> Path:
    """Hugging Face folder of the briefly trained tiny model (cached between runs)."""
    import shutil

    from trained_tiny import recipe_key, train

    folder = Path(pytestconfig.cache.mkdir("cpm-trained-tiny")) / recipe_key(vocab_file)
    if not (folder / "train.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        train(vocab_file, corpus_lines(4000), tmp)
        tmp.rename(folder)
    return folder


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory, trained_hf) -> Path:
    from cpm_deploy.exporter import export_bundle

    from cpm_deploy.exporter import ExportOptions

    out = tmp_path_factory.mktemp("trained") / "bundle"
    variants = (("cpu", "fp32"), ("cpu", "int8"), ("cpu", "int4"), ("trt", "fp16"), ("cuda", "fp16"))
    export_bundle(trained_hf, out, ExportOptions(variants=variants))
    return out


@pytest.fixture(scope="session")
def trained_generator(trained_bundle):
    from cpm_deploy.runtime import CPMGenerator

    return CPMGenerator.from_bundle(trained_bundle, threads=1)
