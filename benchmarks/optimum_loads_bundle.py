"""A cpm-export bundle loads in Optimum as it is, and generates exactly cpm-run's greedy tokens.

    ORTModelForCausalLM.from_pretrained(bundle, file_name="decoder.onnx")

Optimum's ONNX backend pins transformers < 4.58, so it runs in its own environment:
    python -m venv /tmp/optvenv && /tmp/optvenv/bin/pip install torch==2.13.0
    /tmp/optvenv/bin/pip install "optimum-onnx==0.1.0" "transformers<4.58" onnxruntime -e ".[export]"
    /tmp/optvenv/bin/python benchmarks/optimum_loads_bundle.py [--bundle DIR]

Without --bundle it trains nothing: it writes a random CPM-Small checkpoint and exports it.
Prints one row per prompt and writes benchmarks/out/optimum_loads_bundle.json; exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

PROMPTS = ["清华大学", "今天天气很好，我们", "人工智能技术正在改变", "中国足球队在比赛中"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="an existing bundle (default: export a random CPM-Small)")
    ap.add_argument("-n", "--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "optimum_loads_bundle.json")
    args = ap.parse_args()

    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    from cpm_deploy.runtime import CPMGenerator, SamplingConfig

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or _random_small_bundle(Path(tmp))
        model = ORTModelForCausalLM.from_pretrained(bundle, file_name="decoder.onnx", provider="CPUExecutionProvider")
        gen = CPMGenerator.from_bundle(bundle)
        gen.eod_id = -1  # compare exactly n tokens, as Optimum's min_new_tokens does
        rows = []
        for prompt in PROMPTS:
            ids = gen.tokenizer.encode(prompt)
            ours = list(gen.iter_ids([ids], args.new_tokens, 1, SamplingConfig()))[-1][0]
            x = torch.tensor([ids])
            theirs = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens,
                                    min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
            rows.append({"prompt": prompt, "tokens": len(ours), "identical": ours == theirs,
                         "first_difference": next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)})
    print(f"{'prompt':<24}{'tokens':>8}{'identical':>11}")
    for r in rows:
        print(f"{r['prompt']:<24}{r['tokens']:>8}{str(r['identical']):>11}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bundle": str(args.bundle or "random CPM-Small"), "rows": rows}, ensure_ascii=False,
                                   indent=2) + "\n")
    return 0 if all(r["identical"] for r in rows) else 1


def _random_small_bundle(folder: Path) -> Path:
    from cpm_deploy.exporter import export_bundle
    from cpm_deploy.exporter.checkpoint_tools import write_random_checkpoint
    from cpm_deploy.exporter.config import CPMConfig
    from cpm_deploy.runtime.text.tokenizer import DEFAULT_VOCAB

    write_random_checkpoint(CPMConfig.from_preset("small"), folder / "ckpt", seed=0, tokenizer=DEFAULT_VOCAB)
    export_bundle(folder / "ckpt", folder / "bundle")
    return folder / "bundle"


if __name__ == "__main__":
    raise SystemExit(main())
