"""The tokenizer over the API, in vLLM's shapes (what lm-evaluation-harness's remote tokenizer
speaks): ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``. CPM's tokenizer (jieba, then
sentencepiece, with its space and newline pieces) is one clients do not have; with these routes a
client counts and scores tokens exactly as the server does. Nothing here knows of HTTP."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from ..engine import Engine, RequestError
from ..runtime import GenerationError


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str
    # CPM's prompts carry no added tokens (no BOS, no EOS): accepted, and it changes nothing
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    tokens: Annotated[list[int], Field(max_length=1 << 16)]


def tokenize(engine: Engine, body: TokenizeRequest) -> dict:
    """Special tokens written out in the text (``<eod>``) are read as those tokens."""
    try:
        tokens = engine.tokenizer.encode_with_special(body.prompt)
    except ValueError as e:  # not valid Unicode
        raise RequestError(str(e), param="prompt") from None
    return {"count": len(tokens), "max_model_len": engine.capacity, "tokens": tokens, "token_strs": None}


def detokenize(engine: Engine, body: DetokenizeRequest) -> dict:
    try:
        ids = engine.prompt_ids(body.tokens)
    except GenerationError as e:
        raise RequestError(str(e).replace("prompt token ids", "tokens"), param="tokens") from None
    return {"prompt": engine.tokenizer.decode(ids)}


def tokenizer_info(engine: Engine) -> dict:
    tok = engine.tokenizer
    piece = tok.sp.id_to_piece
    return {"tokenizer_class": "CPMTokenizer (jieba + sentencepiece, CPM-Generate's own)",
            "eos_token": piece(tok.eod_id), "eos_token_id": tok.eod_id, "bos_token": None,
            "pad_token": piece(tok.pad_id), "pad_token_id": tok.pad_id, "unk_token": piece(tok.unk_id),
            "unk_token_id": tok.unk_id, "vocab_size": tok.vocab_size, "model_max_length": engine.capacity,
            "special_tokens": tok.special, "chat_template": None}
