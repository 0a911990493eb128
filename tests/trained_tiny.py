"""A tiny CPM trained for seconds on real headlines, so its distributions are peaked and prompt-dependent.

It memorises a few hundred headlines; the softmax is taken over the tokens that occur in them
(the model keeps its full 30,000-row embedding; unseen tokens keep small random logits), which
makes each step ~10x cheaper than a full-vocabulary softmax.

Cached under pytest's cache directory, keyed by the recipe and the vocabulary's bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

RECIPE = {"lines": 300, "steps": 300, "batch": 32, "seq": 32, "lr": 1e-2, "seed": 0, "n_layer": 2, "n_embd": 64, "n_head": 4}


def recipe_key(vocab_file: Path) -> str:
    h = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    h.update(Path(vocab_file).read_bytes())
    return h.hexdigest()[:16]


def train(vocab_file: Path, lines: list[str], out: Path, recipe: dict | None = None) -> Path:
    """Train on ``lines`` (the recipe's first ``lines`` of them) and save a Hugging Face folder."""
    import torch

    from cpm_deploy.exporter.config import CPMConfig
    from cpm_deploy.exporter.hf_format import save_hf_folder
    from cpm_deploy.exporter.state_dict import build_model, random_tensors
    from cpm_deploy.runtime.text.tokenizer import CPMTokenizer

    r = RECIPE | (recipe or {})
    tok = CPMTokenizer(vocab_file)
    cfg = CPMConfig(n_layer=r["n_layer"], n_embd=r["n_embd"], n_head=r["n_head"],
                    vocab_size=tok.vocab_size, n_positions=r.get("n_positions", 128))
    stream = []
    for line in lines[:r["lines"]]:
        stream += tok.encode(line) + [tok.eod_id]
    data = torch.tensor(stream)
    active = torch.unique(data)  # [A] token ids that occur
    remap = torch.full((cfg.vocab_size,), -1, dtype=torch.long)
    remap[active] = torch.arange(len(active))
    torch.manual_seed(r["seed"])
    model = build_model(dict(random_tensors(cfg, r["seed"])), cfg).train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"])
    S, B = r["seq"], r["batch"]
    for _ in range(r["steps"]):
        starts = torch.randint(0, len(data) - S - 1, (B,))
        x = torch.stack([data[s:s + S] for s in starts])
        y = torch.stack([data[s + 1:s + S + 1] for s in starts])
        hidden, _ = model.hidden_states(x)  # [B, S, H]
        logits = hidden @ model.transformer.wte.weight[active].t()  # [B, S, A]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(active)), remap[y].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    save_hf_folder(out, cfg, iter(model.state_dict().items()), tokenizer=Path(vocab_file))
    (out / "train.json").write_text(json.dumps(r | {"final_loss": loss.item()}))
    return out
