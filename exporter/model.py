"""PyTorch reference implementation of CPM-Generate (GPT-2 architecture, pre-LayerNorm).

Module names equal Hugging Face GPT-2's (``transformer.h.0.attn.c_attn.weight`` ...), and weights
keep GPT-2's Conv1D layout [in, out], so a Hugging Face state dict loads without renaming, and the
ONNX export can write each weight as-is for ``MatMul(x, W)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import CPMConfig

MASK_VALUE = -1e4  # finite and fp16-safe; exp(-1e4 - max) is 0 in fp16 and fp32 alike

Past = list[tuple[torch.Tensor, torch.Tensor]]


class Conv1D(nn.Module):
    """Affine map with the weight stored [in, out], as GPT-2 checkpoints store it."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class Attention(nn.Module):
    def __init__(self, cfg: CPMConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)

    def forward(self, x, mask, past_kv):
        B, S, H = x.shape
        q, k, v = self.c_attn(x).split(H, dim=2)  # 3 x [B, S, H]
        q, k, v = (t.view(B, S, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # [B, nh, S, hd]
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)  # [B, nh, T, hd]
            v = torch.cat([past_kv[1], v], dim=2)
        scores = (q * (1.0 / math.sqrt(self.head_dim))) @ k.transpose(-1, -2)  # [B, nh, S, T]
        scores = scores.masked_fill(~mask, MASK_VALUE)
        y = F.softmax(scores, dim=-1) @ v  # [B, nh, S, hd]
        y = y.transpose(1, 2).reshape(B, S, H)
        return self.c_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: CPMConfig):
        super().__init__()
        self.c_fc = Conv1D(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = Conv1D(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(gelu_new(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: CPMConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, mask, past_kv):
        a, present = self.attn(self.ln_1(x), mask, past_kv)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present


class CPMModel(nn.Module):
    """Decoder with a tied output head; ``forward`` serves prefill and decode alike."""

    def __init__(self, cfg: CPMConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.n_positions, cfg.n_embd),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon),
        ))

    def forward(self, input_ids, attention_mask=None, position_ids=None, past: Past | None = None):
        """input_ids [B, S], attention_mask [B, P+S] (1 = real token), position_ids [B, S].

        Returns logits [B, S, V] and presents: per layer (key, value), each [B, nh, P+S, hd].
        """
        x, presents = self.hidden_states(input_ids, attention_mask, position_ids, past)
        return x @ self.transformer.wte.weight.t(), presents  # tied head: [B, S, V]

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, past: Past | None = None):
        """The final-LayerNorm output [B, S, H] and the presents; ``forward`` without the head."""
        B, S = input_ids.shape
        P = 0 if past is None else past[0][0].shape[2]
        T = P + S
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, P:]
        causal = torch.arange(T)[None, :] <= torch.arange(P, T)[:, None]  # [S, T]
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, S, T]
        tr = self.transformer
        x = tr.wte(input_ids) + tr.wpe(position_ids)  # [B, S, H]
        presents = []
        for i, block in enumerate(tr.h):
            x, kv = block(x, mask, None if past is None else past[i])
            presents.append(kv)
        return tr.ln_f(x), presents

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask=None):
        """Whole prompt at once, no past."""
        return self(input_ids, attention_mask)

    @torch.no_grad()
    def decode(self, token_ids, attention_mask, past: Past):
        """One new token per row [B, 1]; attention_mask [B, P+1] already includes it."""
        pos = positions_from_mask(attention_mask)[:, -1:]
        return self(token_ids, attention_mask, pos, past)


def positions_from_mask(attention_mask):
    """Positions count real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def greedy_generate(model: CPMModel, prompt_ids: list[int], max_new_tokens: int, eod_id: int | None = None):
    """Reference greedy decoding of one prompt with a KV cache; returns the new token ids."""
    ids = torch.tensor([prompt_ids])
    mask = torch.ones_like(ids)
    logits, past = model.prefill(ids, mask)
    out = []
    for _ in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if nxt == eod_id:
            break
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
        logits, past = model.decode(torch.tensor([[nxt]]), mask, past)
    return out
