"""cpm-deploy's runtime against Optimum's ORTModelForCausalLM on the same random weights, one run.

Every system runs on onnxruntime's CPU provider with the same thread count, greedy, exactly N new
tokens, the same token ids. Each is timed the same way, alternating, median of repeats:
  time to first token = wall time of a 1-token generation (prefill + first choice);
  decode tokens/s     = (N - 1) / (T(N tokens) - T(1 token)).
Systems: Optimum (fp32), and each graph of one cpm-deploy bundle: decoder_last (standard ops,
concatenating KV cache), cpu-fp32 (fused, shared KV buffer), cpu-int8, cpu-int4.

Optimum's ONNX backend needs its own environment (it pins transformers < 4.58):
    python -m venv /tmp/optvenv && /tmp/optvenv/bin/pip install torch==2.13.0
    /tmp/optvenv/bin/pip install "optimum-onnx==0.1.0" "transformers<4.58" onnxruntime -e ".[export]"
    /tmp/optvenv/bin/python benchmarks/generate_vs_optimum.py --tokenizer ../shared/cpm-vocab/chinese_vocab.model
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from vs_ctranslate2 import timed  # noqa: E402 - the peer benchmarks' one timing, settle pause included


def ours(bundle: Path, threads: int, graph: str):
    from cpm_deploy.runtime import CPMGenerator, SamplingConfig

    gen = CPMGenerator.from_bundle(bundle, threads=threads, verify=False, variant=graph)
    gen.eod_id = -1  # always decode exactly n tokens

    def run(ids: list[int], n: int) -> list[int]:
        out = None
        for out in gen.iter_ids([ids], n, 1, SamplingConfig()):
            pass
        return out[0]

    return run


def optimum(onnx_dir: Path, threads: int):
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    model = ORTModelForCausalLM.from_pretrained(onnx_dir, session_options=so, provider="CPUExecutionProvider")

    def run(ids: list[int], n: int) -> list[int]:
        x = torch.tensor([ids])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
        return out[0, len(ids):].tolist()

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cpm-bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--ttft-prompt", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long", type=int, default=512, help="prompt and new tokens of the long run (0 = skip)")
    ap.add_argument("--graphs", default="decoder_last,cpu-fp32,cpu-int8,cpu-int4")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/out/generate_vs_optimum.json"))
    args = ap.parse_args()

    from cpm_deploy.exporter import export_bundle
    from cpm_deploy.exporter.checkpoint_tools import write_random_checkpoint
    from cpm_deploy.exporter.config import CPMConfig

    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt, bundle, onnx_dir = (args.workdir / f"{args.preset}-{s}" for s in ("random", "bundle", "optimum"))
    if not ckpt.exists():
        write_random_checkpoint(CPMConfig.from_preset(args.preset), ckpt, seed=0, tokenizer=args.tokenizer)
    if not bundle.exists():
        from cpm_deploy.exporter import ExportOptions

        export_bundle(ckpt, bundle, ExportOptions(variants=(("cpu", "fp32"), ("cpu", "int8"), ("cpu", "int4"))))
    else:  # exported by whatever code ran before: say so, a stale bundle measures old graphs
        print(f"reusing {bundle}; delete it to export with this code", flush=True)
    if not onnx_dir.exists():
        from optimum.onnxruntime import ORTModelForCausalLM

        ORTModelForCausalLM.from_pretrained(ckpt, export=True, use_cache=True).save_pretrained(onnx_dir)

    systems = {"optimum": optimum(onnx_dir, args.threads)}
    for graph in args.graphs.split(","):
        systems[graph] = ours(bundle, args.threads, graph)
    rng = np.random.default_rng(0)
    short = rng.integers(100, 30000, args.prompt).tolist()
    long = rng.integers(100, 30000, args.ttft_prompt).tolist()
    outputs = {name: run(short, 16) for name, run in systems.items()}  # warm-up; same weights, same tokens?
    same = {name: out == outputs["optimum"] for name, out in outputs.items()}

    samples = {name: {"t1": [], "tn": [], "ttft_long": [], "long_t1": [], "long_tn": []} for name in systems}
    for _ in range(args.repeats):
        for name, run in systems.items():
            samples[name]["t1"].append(timed(run, short, 1))
            samples[name]["tn"].append(timed(run, short, args.new))
            samples[name]["ttft_long"].append(timed(run, long, 1))
    if args.long:
        prompt = rng.integers(100, 30000, args.long).tolist()
        for name, run in systems.items():  # one repeat: each run decodes 512 tokens
            samples[name]["long_t1"].append(timed(run, prompt, 1))
            samples[name]["long_tn"].append(timed(run, prompt, args.long))
    result = {"preset": args.preset, "threads": args.threads, "prompt": args.prompt, "new_tokens": args.new,
              "ttft_prompt": args.ttft_prompt, "long": args.long, "repeats": args.repeats,
              "same_greedy_tokens_as_optimum": same, "systems": {}}
    for name, s in samples.items():
        t1, tn, tl = (statistics.median(s[k]) for k in ("t1", "tn", "ttft_long"))
        r = {"ttft_short_s": t1, "decode_tokens_per_s": (args.new - 1) / (tn - t1), "ttft_long_s": tl, "samples": s}
        if args.long:
            r["long_decode_tokens_per_s"] = (args.long - 1) / (s["long_tn"][0] - s["long_t1"][0])
        result["systems"][name] = r
    base = result["systems"]["optimum"]
    result["ratios_vs_optimum"] = {
        name: {"decode": r["decode_tokens_per_s"] / base["decode_tokens_per_s"],
               "ttft_long_speedup": base["ttft_long_s"] / r["ttft_long_s"],
               **({"long_decode": r["long_decode_tokens_per_s"] / base["long_decode_tokens_per_s"]} if args.long else {})}
        for name, r in result["systems"].items()}
    print(f"{args.preset}, batch 1, {args.threads} threads; ratios against Optimum fp32 in the same run")
    head = f"{'system':<14} {'decode tok/s':>12} {'ratio':>6} {'TTFT ' + str(args.ttft_prompt):>9} {'ratio':>6}"
    if args.long:
        head += f" {f'{args.long}+{args.long} tok/s':>15} {'ratio':>6}"
    print(head + "  same tokens")
    for name, r in result["systems"].items():
        q = result["ratios_vs_optimum"][name]
        line = (f"{name:<14} {r['decode_tokens_per_s']:>12.1f} {q['decode']:>5.2f}x {r['ttft_long_s'] * 1e3:>7.0f}ms"
                f" {q['ttft_long_speedup']:>5.2f}x")
        if args.long:
            line += f" {r['long_decode_tokens_per_s']:>15.1f} {q['long_decode']:>5.2f}x"
        print(line + f"  {same[name]}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
