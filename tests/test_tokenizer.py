"""CPMTokenizer against CPM-Generate's own algorithm, on real headlines and the real vocabulary."""

import logging
import os
import subprocess
import sys

import jieba
import numpy as np
import pytest
import sentencepiece as spm

from conftest import OLD_VOCAB, REAL_VOCAB, SHARED, corpus_lines, needs_corpus
from cpm_deploy.runtime import CPMTokenizer, StreamDecoder


def cpm_generate_encode(sp, text):
    """What CPM-Generate's tokenizer does (data_utils/tokenization_cpm.py), written out independently."""
    words = [w.translate(str.maketrans(" \n", "\u2582\u2583")) for w in jieba.cut(text, cut_all=False)]
    return sp.encode(" ".join(words))


def cpm_generate_decode(sp, ids):
    return sp.decode(ids).replace(" ", "").replace("\u2582", " ").replace("\u2583", "\n")


@pytest.fixture(scope="module")
def tok(vocab_file):
    return CPMTokenizer(vocab_file)


@needs_corpus
def test_ids_equal_cpm_generate_on_real_headlines(tok, vocab_file):
    sp = spm.SentencePieceProcessor(model_file=str(vocab_file))
    lines = corpus_lines(2000)
    assert all(tok.encode(t) == cpm_generate_encode(sp, t) for t in lines)
    assert all(tok.decode(tok.encode(t)) == cpm_generate_decode(sp, cpm_generate_encode(sp, t)) for t in lines[:500])


def test_special_ids_and_whitespace(tok):
    assert (tok.eod_id, tok.pad_id, tok.vocab_size) == (7, 5, 30000)
    ids = tok.encode("清华大学 位于北京\n海淀区")
    assert 10 in ids and 3 in ids  # U+2582 (space) and U+2583 (newline) pieces
    assert tok.decode(ids) == "清华大学 位于北京\n海淀区"


def test_round_trip_keeps_spaces_and_newlines(tok):
    text = "今天 天气很好。\n我们  去公园"
    assert tok.decode(tok.encode(text)) == text


def test_differs_from_plain_sentencepiece(tok):
    """Hugging Face's CpmTokenizer skips jieba; the ids must not be plain sentencepiece's."""
    sp = spm.SentencePieceProcessor(model_file=str(REAL_VOCAB))
    lines = corpus_lines(200)
    assert any(tok.encode(t) != sp.encode(t) for t in lines)


@pytest.mark.skipif(not OLD_VOCAB.is_file(), reason="needs ../shared/cpm-vocab (the pre-2020-11-22 release)")
def test_old_vocabulary_warns_once_about_newlines(caplog):
    old = CPMTokenizer(OLD_VOCAB)
    assert not old.supports_newline
    with caplog.at_level(logging.WARNING, logger="cpm_deploy"):
        ids = old.encode("第一行\n第二行")
        old.encode("第三行\n第四行")
    assert old.unk_id in ids
    assert caplog.text.count("no newline piece") == 1


def test_batch_and_left_padding(tok):
    batch = tok.encode_batch(["清华大学", "今天天气很好，我们一起去公园散步吧"])
    ids, mask = tok.pad_left(batch)
    assert ids.shape == mask.shape == (2, len(batch[1]))
    assert mask[0].tolist() == [0] * (len(batch[1]) - len(batch[0])) + [1] * len(batch[0])
    assert ids[0, -len(batch[0]):].tolist() == batch[0] and np.all(ids[0, mask[0] == 0] == tok.pad_id)


def test_stream_decoder_joins_to_full_text(tok):
    ids = tok.encode("人工智能技术正在改变 我们的生活\n和工作方式")
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_holds_back_partial_characters():
    class Bytes:  # a tokenizer whose pieces are UTF-8 bytes, like sentencepiece byte fallback
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = StreamDecoder(Bytes())
    out = [stream.push(b) for b in "清华".encode()]
    assert out == ["", "", "清", "", "", "华"]


def test_quiet_lazy_and_torch_free(vocab_file):
    code = ("import sys; import cpm_deploy.runtime as r; assert 'jieba' not in sys.modules; "
            f"t = r.CPMTokenizer({str(vocab_file)!r}); t.encode('清华大学'); "
            "assert 'torch' not in sys.modules, 'runtime imported torch'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # jieba's "Building prefix dict" chatter is silenced


def test_bad_model_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        CPMTokenizer(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        CPMTokenizer(tmp_path / "bad.model")


def test_default_install_is_torch_free():
    import tomllib

    from conftest import ROOT

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.split(">")[0].split("=")[0].strip() == "torch" for d in project["dependencies"])
    assert any(d.startswith("torch") for d in project["optional-dependencies"]["export"])


def test_jieba_cache_goes_to_the_user_cache(tmp_path, vocab_file):
    code = f"import cpm_deploy.runtime as r; r.CPMTokenizer({str(vocab_file)!r}).encode('清华')"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert list((tmp_path / "cpm-deploy").glob("jieba*.cache"))


def test_every_package_folder_is_installed():
    """pyproject lists packages explicitly; a folder left out would vanish from a regular install."""
    import tomllib

    from conftest import ROOT

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"cpm_deploy"} | {"cpm_deploy." + ".".join(p.parent.relative_to(ROOT).parts)
                              for p in ROOT.glob("*/**/__init__.py")
                                  if not p.relative_to(ROOT).parts[0].startswith(".")  # a .venv inside the clone
                                  and p.parent.name not in ("tests", "benchmarks")}
    assert found <= listed, found - listed


def test_the_shipped_vocabulary_is_cpms():
    from cpm_deploy.runtime.bundle.verified import sha256_file

    assert sha256_file(REAL_VOCAB) == "25c1d178d54901291c1735cd2ae0788be90df4de01fb445e8a8a998cab35ba43"
    shared = SHARED / "cpm-vocab" / "chinese_vocab.model"
    assert not shared.is_file() or shared.read_bytes() == REAL_VOCAB.read_bytes()
