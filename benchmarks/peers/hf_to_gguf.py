"""A CPM Hugging Face folder (GPT-2 layout, as cpm-checkpoint writes it) as an f32 GGUF for llama.cpp.

llama.cpp's own converter wants a GPT-2 byte-level BPE tokenizer it recognises; CPM's is a
sentencepiece model, so this writes the weights under llama.cpp's gpt2 architecture and the
vocabulary as a sentencepiece ("llama") tokenizer. The benchmarks send prompts as CPM token ids, so
only the vocabulary's size and special ids matter to them. Tensors stream to the file one at a time.

    python benchmarks/peers/hf_to_gguf.py HF_FOLDER OUT.gguf
then `llama-quantize OUT.gguf OUT-q8_0.gguf q8_0` (build_llama_cpp.sh does both).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np
import sentencepiece as spm
from safetensors import safe_open

# Conv1D weights are [in, out]; GGUF keeps [out, in] (PyTorch Linear's layout)
NAMES = {"ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
         "attn.c_attn.weight": "attn_qkv.weight", "attn.c_attn.bias": "attn_qkv.bias",
         "attn.c_proj.weight": "attn_output.weight", "attn.c_proj.bias": "attn_output.bias",
         "ln_2.weight": "ffn_norm.weight", "ln_2.bias": "ffn_norm.bias",
         "mlp.c_fc.weight": "ffn_up.weight", "mlp.c_fc.bias": "ffn_up.bias",
         "mlp.c_proj.weight": "ffn_down.weight", "mlp.c_proj.bias": "ffn_down.bias"}
TOP = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
       "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}


def tensors(folder: Path):
    """(GGUF name, loader) in file order; the head is tied to token_embd, as llama.cpp's gpt2 allows."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    for file in files:
        with safe_open(str(folder / file), "np") as f:
            for key in f.keys():
                if key in TOP:
                    yield TOP[key], file, key, False
                elif key.startswith("transformer.h."):
                    layer, rest = key.removeprefix("transformer.h.").split(".", 1)
                    if rest in NAMES:
                        yield f"blk.{layer}.{NAMES[rest]}", file, key, rest.endswith("weight") and "ln_" not in rest


def main(folder: Path, out: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    w = gguf.GGUFWriter(str(out), "gpt2")
    w.add_name(folder.name)
    w.add_context_length(cfg["n_positions"])
    w.add_embedding_length(cfg["n_embd"])
    w.add_feed_forward_length(cfg.get("n_inner") or 4 * cfg["n_embd"])
    w.add_block_count(cfg["n_layer"])
    w.add_head_count(cfg["n_head"])
    w.add_layer_norm_eps(cfg.get("layer_norm_epsilon", 1e-5))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = cfg["vocab_size"]
    types = [gguf.TokenType.CONTROL if sp.is_control(i) else gguf.TokenType.UNKNOWN if sp.is_unknown(i)
             else gguf.TokenType.NORMAL for i in range(sp.get_piece_size())]
    pieces = [sp.id_to_piece(i).encode() for i in range(sp.get_piece_size())]
    scores = [sp.get_score(i) for i in range(sp.get_piece_size())]
    for i in range(len(pieces), vocab):  # a model vocabulary padded past the tokenizer's
        pieces.append(f"[PAD{i}]".encode())
        scores.append(-1e4)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces[:vocab])
    w.add_token_scores(scores[:vocab])
    w.add_token_types(types[:vocab])
    eod = cfg.get("eos_token_id", 7)
    w.add_bos_token_id(eod)
    w.add_eos_token_id(eod)
    w.add_unk_token_id(max(sp.unk_id(), 0))
    w.add_add_bos_token(False)
    plan = list(tensors(folder))
    for name, file, key, transpose in plan:
        with safe_open(str(folder / file), "np") as f:
            shape = f.get_slice(key).get_shape()
        shape = shape[::-1] if transpose else shape
        w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, file, key, transpose in plan:
        with safe_open(str(folder / file), "np") as f:
            x = f.get_tensor(key).astype(np.float32)
        w.write_tensor_data(np.ascontiguousarray(x.T if transpose else x))
    w.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
