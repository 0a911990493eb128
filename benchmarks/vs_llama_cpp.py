"""cpm-deploy's CPU graphs against llama.cpp's llama-bench at batch 1, on the same weights, in one run.

    python benchmarks/vs_llama_cpp.py --llama-bench /path/to/llama-bench \\
        --gguf f32=small-f32.gguf --gguf q8_0=small-q8_0.gguf --gguf q4_0=small-q4_0.gguf \\
        [--workdir /tmp/cpm-ct2]    # the bundle vs_ctranslate2.py built (the GGUFs hold its weights)
        [--int4-block-sizes 64,128] [--gguf-py llama.cpp/gguf-py]

llama.cpp is not a dependency: build its llama-bench yourself (llama-cpp-python's source
distribution vendors llama.cpp) and convert the same checkpoint to GGUF (gpt2 architecture).
Measures, threads equal:
  llama-bench  pp512 (512-token prompt, tokens/s) and tg128 (128 generated tokens, tokens/s);
  ours         prompt tokens/s = 512 / TTFT of a 512-token prompt (prefill + first choice), and
               decode tokens/s = (N - 1) / (T(N) - T(1)) after a 32-token prompt, N = 128.
Pairs: cpu-fp32 vs f32, cpu-int8 vs q8_0, cpu-int4 vs q4_0, and cpu-int4 exported with coarser 4-bit
blocks (--int4-block-sizes; block 64 with fp32 scales stores as many bytes per weight as q4_0's
block 32 with fp16 ones) vs q4_0 again. With --gguf-py (llama.cpp's own reader), the 4-bit weights'
error is compared too: each side dequantized against the same fp32 weights. Round-robin: each repeat times every
system once (llama-bench with -r 1), and each figure is the median over repeats; this machine's
speed drifts by up to a third over minutes, and a drift must land on both sides of a pair.
Prints the table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from vs_ctranslate2 import ours, timed  # noqa: E402 - one way of timing our graphs for both peers

PAIRS = {"cpu-fp32": "f32", "cpu-int8": "q8_0", "cpu-int4": "q4_0"}
LINEAR = {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def llama_bench(binary: Path, gguf: Path, threads: int) -> dict:
    out = subprocess.run([str(binary), "-m", str(gguf), "-p", "512", "-n", "128", "-t", str(threads),
                          "-r", "1", "-o", "json"], capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    pp = next(r for r in rows if r["n_prompt"] == 512 and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] == 128 and r["n_prompt"] == 0)
    return {"prompt512_tok_s": pp["avg_ts"], "decode_tok_s": tg["avg_ts"],
            "build": rows[0].get("build_commit"), "cpu": rows[0].get("cpu_info")}


def ours_b1(bundle: Path, graph: str, threads: int, new: int):
    """One repeat of our figures per call, the graph loaded and both shapes warmed up once."""
    run = ours(bundle, graph, threads)
    rng = np.random.default_rng(0)
    short, long = [rng.integers(100, 30000, 32).tolist()], [rng.integers(100, 30000, 512).tolist()]
    run(short, 2), run(long, 1)

    def once() -> dict:
        t1, tn, ttft = timed(run, short, 1), timed(run, short, new), timed(run, long, 1)
        return {"prompt512_tok_s": 512 / ttft, "decode_tok_s": (new - 1) / (tn - t1)}

    return once


def int4_bundle(workdir: Path, preset: str, block: int) -> Path:
    """The preset's checkpoint exported as cpu-int4 with ``block``-sized 4-bit blocks (once)."""
    from cpm_deploy.exporter import ExportOptions, export_bundle

    out = workdir / f"{preset}-bundle-int4-b{block}"
    if not out.exists():
        export_bundle(workdir / f"{preset}-ckpt", out,
                      ExportOptions(variants=(("cpu", "int4"),), variants_only=True, int4_block_size=block))
    return out


def our_int4_weights(bundle: Path) -> dict[str, np.ndarray]:
    """Layer weights (the head aside) of a cpu-int4 graph, dequantized, by GGUF name: [N, K] as
    GGUF (and PyTorch's Linear) keeps them; transformer.h.3.mlp.c_fc.weight -> blk.3.ffn_up.weight."""
    import onnx
    from onnx import numpy_helper

    from cpm_deploy.runtime import Bundle

    graph = Bundle.open(bundle, verify=False).manifest["graphs"]["cpu-int4"]
    model = onnx.load(str(bundle / graph["file"]))
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type != "MatMulNBits" or attrs["bits"] != 4 or not node.input[1].startswith("transformer.h."):
            continue
        packed = numpy_helper.to_array(inits[node.input[1]])  # [N, blocks, block / 2] uint8, low nibble first
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(packed.shape[0], packed.shape[1], 1)
        q = np.stack([packed & 0xF, packed >> 4], -1).reshape(packed.shape[0], packed.shape[1], -1).astype(np.float32)
        parts = node.input[1].split(".")  # transformer.h.<layer>.<attn|mlp>.<c_attn|c_proj|c_fc>.weight_Q4
        name = f"blk.{parts[2]}.{LINEAR[parts[3] + '.' + parts[4]]}.weight"
        out[name] = ((q - 8) * scales).reshape(attrs["N"], -1)[:, :attrs["K"]]  # symmetric: zero point 8
    return out


def weight_error(ggufs: dict, int4_bundles: dict, gguf_py: Path) -> dict:
    """Relative RMS error of the 4-bit layer weights (sum of squared errors / sum of squares, rooted),
    q4_0 against the f32 GGUF, ours against the same weights in the f32 GGUF."""
    sys.path.insert(0, str(gguf_py))
    from gguf import GGUFReader
    from gguf.quants import dequantize

    def layer_linears(path):
        return {t.name: dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
                for t in GGUFReader(path).tensors  # blk.<layer>.<linear>.weight, biases and norms aside
                if t.name.startswith("blk.") and t.name.endswith(".weight") and t.name.split(".")[2] in LINEAR.values()}

    ref = layer_linears(ggufs["f32"])

    def rel(got: dict[str, np.ndarray]) -> float:
        err = sum(float(np.sum((got[k] - ref[k]) ** 2)) for k in got)
        return round((err / sum(float(np.sum(ref[k] ** 2)) for k in got)) ** 0.5, 5)

    return {"llama.cpp q4_0": rel(layer_linears(ggufs["q4_0"])),
            **{name: rel(our_int4_weights(bundle)) for name, bundle in int4_bundles.items()}}


def _median(rounds: list[dict]) -> dict:
    return {k: (round(statistics.median(r[k] for r in rounds), 1) if isinstance(rounds[0][k], float) else rounds[0][k])
            for k in rounds[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", type=Path, required=True)
    ap.add_argument("--gguf", action="append", default=[], metavar="TYPE=FILE", help="f32, q8_0 or q4_0 (repeatable)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cpm-ct2"))
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--int4-block-sizes", type=lambda v: [int(b) for b in v.split(",") if b], default=[64, 128],
                    help="cpu-int4 also exported with these 4-bit block sizes, each paired with q4_0 ('' for none)")
    ap.add_argument("--gguf-py", type=Path, help="llama.cpp's gguf-py folder: compare the 4-bit weights' error too")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "vs_llama_cpp.json")
    args = ap.parse_args()

    ggufs = dict(g.split("=", 1) for g in args.gguf)
    bundle = args.workdir / f"{args.preset}-bundle"
    pairs = {graph: peer for graph, peer in PAIRS.items() if peer in ggufs}
    int4_bundles = {"cpu-int4": bundle} if "q4_0" in ggufs else {}
    for block in args.int4_block_sizes if "q4_0" in ggufs else []:
        int4_bundles[f"cpu-int4 b{block}"] = int4_bundle(args.workdir, args.preset, block)
        pairs[f"cpu-int4 b{block}"] = "q4_0"
    mine = {graph: ours_b1(int4_bundles.get(graph, bundle), graph.split()[0], args.threads, args.new)
            for graph in pairs}
    by_peer: dict[str, list[str]] = {}
    for graph, peer in pairs.items():
        by_peer.setdefault(peer, []).append(graph)
    rounds = {name: [] for graph, peer in pairs.items() for name in (graph, f"llama.cpp {peer}")}
    for r in range(args.repeats):
        for peer, graphs in by_peer.items():  # the peer, then each graph paired with it
            rounds[f"llama.cpp {peer}"].append(llama_bench(args.llama_bench, Path(ggufs[peer]), args.threads))
            for graph in graphs:
                rounds[graph].append(mine[graph]())
            print(f"repeat {r + 1}: {peer} {_median(rounds[f'llama.cpp {peer}'][-1:])}; "
                  + "; ".join(f"{g} {_median(rounds[g][-1:])}" for g in graphs), flush=True)
    results = {name: _median(values) for name, values in rounds.items()}

    print(f"\n{args.preset}, batch 1, {args.threads} threads")
    print(f"{'system':<18}{'decode tok/s':>14}{'prompt-512 tok/s':>18}{'decode ratio':>14}{'prompt ratio':>14}")
    ratios = {}
    for peer, graphs in by_peer.items():
        theirs = results[f"llama.cpp {peer}"]
        print(f"{'llama.cpp ' + peer:<18}{theirs['decode_tok_s']:>14.1f}{theirs['prompt512_tok_s']:>18.1f}")
        for graph in graphs:
            ours_r = results[graph]
            ratios[graph] = {k: round(ours_r[k] / theirs[k], 2) for k in ("decode_tok_s", "prompt512_tok_s")}
            print(f"{graph:<18}{ours_r['decode_tok_s']:>14.1f}{ours_r['prompt512_tok_s']:>18.1f}"
                  f"{ratios[graph]['decode_tok_s']:>13.2f}x{ratios[graph]['prompt512_tok_s']:>13.2f}x")
    errors = weight_error(ggufs, int4_bundles, args.gguf_py) if args.gguf_py and {"f32", "q4_0"} <= set(ggufs) else {}
    if errors:
        print("\n4-bit layer weights, relative RMS error against the fp32 weights:")
        for name, e in errors.items():
            print(f"{name:<18}{e:>10.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"preset": args.preset, "threads": args.threads, "results": results,
                                    "ratios": ratios, "int4_weight_error": errors}, indent=2) + "\n")


if __name__ == "__main__":
    main()
