"""cpm-deploy's CPU graphs against CTranslate2 on the same random weights, in one run.

    pip install ctranslate2      # not a project dependency
    python benchmarks/vs_ctranslate2.py --workdir /tmp/cpm-ct2 [--preset small]

Every system gets the same token ids (CTranslate2 takes them as vocabulary strings; the tokenizer
plays no part in the timing), the same threads, greedy, exactly N new tokens:
  TTFT          = wall time of a 1-token generation (prefill + first choice), median of repeats
                  (--ttft-repeats of them, 9 by default; --repeats, 5, of each N-token generation);
  every cell is timed for all systems in turn, repeat after repeat (round-robin), so that
  a slow minute on this machine is shared by all of them;
  decode tok/s  = batch x (N - 1) / (T(N) - T(1));
  prompt tok/s  = batch x prompt length / TTFT.
Systems: CTranslate2 float32 and int8, cpu-fp32, cpu-int8, cpu-int4 of one bundle.
Prints the table (decode at batch 1/4/8/16; TTFT for 32- and 512-token prompts at batch 1 and 8)
with ratios against the CTranslate2 system each graph is measured against, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

BATCHES = (1, 4, 8, 16)
PROMPTS = ((32, 1), (32, 8), (512, 1), (512, 8))  # (prompt tokens, batch) for TTFT
PEER = {"cpu-fp32": "ct2-float32", "cpu-int8": "ct2-int8", "cpu-int4": "ct2-int8"}


def ours(bundle: Path, graph: str, threads: int):
    from cpm_deploy.runtime import CPMGenerator, SamplingConfig

    gen = CPMGenerator.from_bundle(bundle, variant=graph, threads=threads, verify=False)
    gen.eod_id = -1  # exactly n tokens

    def run(rows: list[list[int]], n: int) -> list[list[int]]:
        out = None
        for out in gen.iter_ids(rows, n, 1, SamplingConfig()):
            pass
        return out

    return run


def ct2(model_dir: Path, compute_type: str, threads: int, pieces: list[str]):
    import ctranslate2

    gen = ctranslate2.Generator(str(model_dir), device="cpu", compute_type=compute_type, intra_threads=threads,
                                inter_threads=1)
    index = {p: i for i, p in enumerate(pieces)}

    def run(rows: list[list[int]], n: int) -> list[list[int]]:
        res = gen.generate_batch([[pieces[t] for t in r] for r in rows], max_length=n, min_length=n, sampling_topk=1,
                                 include_prompt_in_result=False, end_token=[])
        return [[index[t] for t in r.sequences[0]] for r in res]

    return run


def convert_for_ct2(ckpt: Path, out: Path, quantization: str | None, pieces: list[str]) -> Path:
    """The converter wants a GPT-2 tokenizer: a vocab.json of CPM's pieces and an empty merges list."""
    import shutil

    import ctranslate2

    if out.exists():
        return out
    src = out.with_name(out.name + "-src")
    shutil.copytree(ckpt, src, dirs_exist_ok=True)
    (src / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(pieces)}, ensure_ascii=False))
    (src / "merges.txt").write_text("#version: 0.2\n")
    (src / "tokenizer_config.json").write_text(json.dumps(  # CPM's own specials: no token gets added
        {"tokenizer_class": "GPT2Tokenizer", "unk_token": "<unk>", "bos_token": "<eod>", "eos_token": "<eod>"}))
    ctranslate2.converters.TransformersConverter(str(src)).convert(str(out), quantization=quantization, force=True)
    return out


# Pause before each timed call: a system's worker threads keep spinning after it returns (MKL's
# OpenMP threads for 200 ms by default), and on 2 cores that would be charged to the next system.
# Without it, round-robin timing put ~19 ms on our 10 ms short-prompt cells.
SETTLE_S = 0.4


def timed(run, rows, n) -> float:
    time.sleep(SETTLE_S)
    t0 = time.perf_counter()
    run(rows, n)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cpm-ct2"))
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ttft-repeats", type=int, default=9,
                    help="repeats of the 1-token cells (TTFT, and T(1) of decode): single repeats of a prompt "
                         "spread 0.87-1.26x around the median here, so they get more")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "vs_ctranslate2.json")
    args = ap.parse_args()

    import sentencepiece as spm

    from cpm_deploy.exporter import ExportOptions, export_bundle
    from cpm_deploy.exporter.checkpoint_tools import write_random_checkpoint
    from cpm_deploy.exporter.config import CPMConfig
    from cpm_deploy.runtime.text.tokenizer import DEFAULT_VOCAB

    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    ckpt, bundle = w / f"{args.preset}-ckpt", w / f"{args.preset}-bundle"
    if not ckpt.exists():
        write_random_checkpoint(CPMConfig.from_preset(args.preset), ckpt, seed=0, tokenizer=DEFAULT_VOCAB)
    if not bundle.exists():
        export_bundle(ckpt, bundle, ExportOptions(variants=(("cpu", "fp32"), ("cpu", "int8"), ("cpu", "int4"))))
    else:  # exported by whatever code ran before: say so, a stale bundle measures old graphs
        print(f"reusing {bundle}; delete it to export with this code", flush=True)
    sp = spm.SentencePieceProcessor(model_file=str(DEFAULT_VOCAB))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    systems = {
        "ct2-float32": ct2(convert_for_ct2(ckpt, w / "ct2-float32", None, pieces), "float32", args.threads, pieces),
        "ct2-int8": ct2(convert_for_ct2(ckpt, w / "ct2-int8", "int8", pieces), "int8", args.threads, pieces),
        **{g: ours(bundle, g, args.threads) for g in PEER},
    }
    rng = np.random.default_rng(0)
    ids = {length: rng.integers(100, 30000, length).tolist() for length in (32, 512)}
    same = {name: run([ids[32]], 16) == systems["ct2-float32"]([ids[32]], 16) for name, run in systems.items()}

    # Every cell is timed round-robin across the systems, repeat by repeat: this machine's speed
    # drifts by up to a third over minutes, and a drift must not land on one system's cells only.
    cells = [(f"b{b}", [ids[32]] * b, n) for b in BATCHES for n in (1, args.new)]
    cells += [(f"b{b}_ttft{length}", [ids[length]] * b, 1) for length, b in PROMPTS]
    times = {name: {} for name in systems}
    for key, rows, n in cells:
        for run in systems.values():
            run(rows, min(n, 2))  # warm-up of this shape
        for _ in range(args.ttft_repeats if n == 1 else args.repeats):
            for name, run in systems.items():
                times[name].setdefault((key, n), []).append(timed(run, rows, n))
        print(key, n, {name: round(1000 * statistics.median(t[(key, n)]), 1) for name, t in times.items()}, flush=True)
    results = {name: {} for name in systems}
    for name, t in times.items():
        med = {k: statistics.median(v) for k, v in t.items()}
        for b in BATCHES:
            t1, tn = med[(f"b{b}", 1)], med[(f"b{b}", args.new)]
            results[name][f"b{b}_decode_tok_s"] = round(b * (args.new - 1) / (tn - t1), 1)
            results[name][f"b{b}_ttft32_ms"] = round(1000 * t1, 1)
        for length, b in PROMPTS:
            t1 = med[(f"b{b}_ttft{length}", 1)]
            results[name][f"b{b}_ttft{length}_ms"] = round(1000 * t1, 1)
            results[name][f"b{b}_prompt{length}_tok_s"] = round(b * length / t1, 1)
    # TTFT ratio of each repeat (ours against its peer in the same round): how far one
    # repeat's noise moves a cell
    spread = {g: {f"b{b}_ttft{length}_ms": _range([p / o for o, p in zip(times[g][k], times[peer][k])])
                  for length, b in PROMPTS for k in [(f"b{b}_ttft{length}", 1)]} for g, peer in PEER.items()}
    report(results, same, spread, args)


def _range(values: list[float]) -> list[float]:
    return [round(min(values), 2), round(max(values), 2)]


def report(results: dict, same: dict, spread: dict, args) -> None:
    cols = [f"b{b}_decode_tok_s" for b in BATCHES] + [f"b{b}_ttft{n}_ms" for n, b in PROMPTS]
    heads = [f"b{b} decode" for b in BATCHES] + [f"TTFT {n} b{b}" for n, b in PROMPTS]
    print(f"\n{args.preset}, {args.threads} threads, {args.new} new tokens; same greedy tokens as ct2-float32: {same}")
    print(f"{'system':<12}" + "".join(f"{h:>14}" for h in heads))
    for name, r in results.items():
        print(f"{name:<12}" + "".join(f"{r[c]:>14.1f}" for c in cols))
    ratios = {}
    for name, peer in PEER.items():
        r, p = results[name], results[peer]
        ratios[name] = {c: round((r[c] / p[c]) if "decode" in c else (p[c] / r[c]), 2) for c in cols}
    print("\nratios (higher is better; decode: ours / peer, TTFT: peer / ours), against " +
          ", ".join(f"{k} vs {v}" for k, v in PEER.items()))
    for name, q in ratios.items():
        print(f"{name:<12}" + "".join(f"{q[c]:>14.2f}" for c in cols))
    print("\nTTFT ratio, lowest and highest single repeat")
    for name, cells in spread.items():
        print(f"{name:<12}" + "".join(f"{c.split('_')[1]} {c.split('_')[0]}: {lo:.2f}-{hi:.2f}  " for c, (lo, hi) in cells.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"preset": args.preset, "threads": args.threads, "new_tokens": args.new,
                                    "repeats": args.repeats, "ttft_repeats": args.ttft_repeats,
                                    "same_greedy_tokens": same, "results": results, "ratios": ratios,
                                    "ttft_ratio_range": spread}, indent=2) + "\n")


if __name__ == "__main__":
    main()
