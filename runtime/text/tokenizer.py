"""CPM-Generate's tokenizer, exactly as its own code tokenizes (not Hugging Face's CpmTokenizer).

encode: jieba.cut(text, cut_all=False) -> in each word ' ' -> U+2582, '\\n' -> U+2583 -> words
joined with ' ' -> sentencepiece BPE. decode: sentencepiece decode -> drop every ' ' ->
U+2582 -> ' ', U+2583 -> '\\n'.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..errors import CPMError
from ..backends.padding import left_pad

log = logging.getLogger("cpm_deploy")

SPACE, NEWLINE = "\u2582", "\u2583"
SPECIAL_PIECES = ("<unk>", "<s>", "</s>", "<sep>", "<pad>", "<mask>", "<eod>")  # as Hugging Face tokenizers read them
# CPM-Generate's own vocabulary (MIT, 713 KB), shipped as the default: see vocab/NOTICE
DEFAULT_VOCAB = Path(__file__).with_name("vocab") / "chinese_vocab.model"
_TO_PIECES = str.maketrans({" ": SPACE, "\n": NEWLINE})
_jieba = None
_jieba_lock = threading.Lock()


def _segmenter():
    """jieba's default tokenizer, initialised once per process, quietly, on first use.

    jieba caches its prefix dictionary; the cache goes to the user's cache folder (not /tmp,
    which is emptied on reboot), so only the very first run pays for building it.
    """
    global _jieba
    if _jieba is None:
        with _jieba_lock:
            if _jieba is None:
                import jieba

                jieba.setLogLevel(logging.WARNING)  # it logs "Building prefix dict..." to stderr
                cache = _cache_dir()
                if cache is not None:
                    jieba.dt.tmp_dir = str(cache)
                jieba.initialize()
                _jieba = jieba
    return _jieba


def _cache_dir() -> Path | None:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cpm-deploy"
    try:
        base.mkdir(parents=True, exist_ok=True)
        return base if os.access(base, os.W_OK) else None
    except OSError:
        return None  # read-only home: jieba falls back to the temp dir


class TokenizerError(CPMError, ValueError):
    """Text the tokenizer cannot take (not valid Unicode)."""


class CPMTokenizer:
    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model {path} not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a sentencepiece model: {e}") from None
        self.eod_id = self._special("<eod>", 7)
        self.pad_id = self._special("<pad>", self.eod_id)
        self.unk_id = self.sp.unk_id()
        # The release before 2020-11-22 has <cls> at id 3 and no newline piece: '\n' becomes <unk>.
        self.supports_newline = self.sp.piece_to_id(NEWLINE) != self.unk_id
        self._warned_newline = False
        self.special = {p: self.sp.piece_to_id(p) for p in SPECIAL_PIECES
                        if p == "<unk>" or self.sp.piece_to_id(p) != self.unk_id}
        self._special_split = re.compile("(" + "|".join(map(re.escape, self.special)) + ")")

    def _special(self, piece: str, default: int) -> int:
        i = self.sp.piece_to_id(piece)
        return default if i == self.sp.unk_id() else i

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def tokenize(self, text: str) -> str:
        """The string handed to sentencepiece: jieba words, mapped, joined by spaces."""
        return " ".join(word.translate(_TO_PIECES) for word in _segmenter().cut(text, cut_all=False))

    def encode(self, text: str) -> list[int]:
        try:
            text.encode("utf-8")  # sentencepiece's C++ side raises a bare RuntimeError on lone surrogates
        except UnicodeEncodeError as e:
            raise TokenizerError(f"the text is not valid Unicode: {e.object[e.start:e.end]!a} at position {e.start} "
                                 "(a lone surrogate)") from None
        if "\n" in text and not self.supports_newline and not self._warned_newline:
            self._warned_newline = True
            log.warning("this chinese_vocab.model is the release before 2020-11-22 (no newline piece): "
                        "newlines encode to <unk>; use the current vocabulary")
        return self.sp.encode(self.tokenize(text))

    def encode_with_special(self, text: str) -> list[int]:
        """As ``encode``, but the vocabulary's special tokens written out in the text (``<eod>``,
        ``<pad>``, ...) are those tokens, as Hugging Face tokenizers read them; CPM's own code (and
        ``encode``) reads them as plain characters."""
        ids: list[int] = []
        for part in self._special_split.split(text):
            if part in self.special:
                ids.append(self.special[part])
            elif part:
                ids += self.encode(part)
        return ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        text = self.sp.decode([int(i) for i in ids])
        return text.replace(" ", "").replace(SPACE, " ").replace(NEWLINE, "\n")

    def pad_left(self, batch: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ids [B, S] and attention_mask [B, S] (int64)."""
        ids, mask, _ = left_pad(batch, self.pad_id)
        return ids, mask


class StreamDecoder:
    """Turns a growing list of ids into text deltas, never emitting half a character."""

    def __init__(self, tokenizer: CPMTokenizer):
        self.tok, self.ids, self.emitted = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence from byte pieces: wait for the rest
            return ""
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta
