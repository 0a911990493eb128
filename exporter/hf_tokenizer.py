"""CPM-Generate's tokenizer as a Hugging Face tokenizer, copied (not imported) into every bundle as
``tokenization_cpm_deploy.py`` (with ``tokenizer_config.json``), so that

    AutoTokenizer.from_pretrained(bundle, trust_remote_code=True)

encodes exactly as cpm-deploy's runtime and CPM's own code do: jieba words, ' ' -> U+2582 and
'\\n' -> U+2583 in each word, words joined by spaces, then sentencepiece BPE; decoding drops the
joining spaces and maps the two pieces back. Nothing is added around a text (CPM uses no BOS or
EOS; ``<eod>`` ends a document).

transformers' own ``CpmTokenizer`` does not: from transformers 5 it runs no jieba segmentation and
maps no spaces or newlines (and needs rjieba installed); before that, as an XLNet tokenizer, it
normalized text with NFKD (fullwidth punctuation such as '，' became ',') unless ``keep_accents``
was set, and added ``<sep>`` ``<cls>`` with ``add_special_tokens``. This file stands alone: it imports
transformers, jieba and sentencepiece, not cpm-deploy; a test holds it to the runtime's tokenizer.
"""

from __future__ import annotations

import os
import shutil

import jieba
import sentencepiece as spm
from transformers import PreTrainedTokenizer

SPACE, NEWLINE = "\u2582", "\u2583"


class CPMDeployTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "spiece.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, eos_token: str = "<eod>", pad_token: str = "<pad>", unk_token: str = "<unk>",
                 **kwargs):
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
        self.translator = str.maketrans({" ": SPACE, "\n": NEWLINE})
        kwargs.setdefault("additional_special_tokens", ["<sep>", "<mask>", "<s>", "</s>"])
        super().__init__(eos_token=eos_token, pad_token=pad_token, unk_token=unk_token, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        words = " ".join(w.translate(self.translator) for w in jieba.cut(text, cut_all=False))
        return self.sp_model.encode(words, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        text = self.sp_model.decode([self.sp_model.piece_to_id(t) for t in tokens])
        return text.replace(" ", "").replace(SPACE, " ").replace(NEWLINE, "\n")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "spiece.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
