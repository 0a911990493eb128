"""What bounds cpu-int4's batch-1 decode: onnxruntime's 4-bit MatMulNBits, one decode step's worth.

    python benchmarks/int4_kernel.py [--preset small] [--block-sizes 32,64,128] [--repeats 9]

For each 4-bit block size, one graph holds every MatMul of one decode step of the preset (each
layer's QKV, attention output, MLP up and down, and the tied head), each a MatMulNBits node as
cpu-int4 exports it (the export's own quantizer: symmetric, accuracy level 4, int8 activations on
VNNI), fed one row. The weights are random (the kernel's time does not depend on their values) and
sit on huge pages, as the runtime puts them. The graphs run round-robin (each turn first runs a few untimed calls: decode
steps run one graph back to back, and the other graphs' turns push its weights out of cache), each
figure the median over repeats.

Bytes per weight are counted as onnxruntime's CPU kernel holds them after prepacking, not as the
file stores them: with int8 activations MLAS keeps, per block, the 4-bit data, one fp32 scale and
one fp32 block sum (the scale times the zero point, which corrects its unsigned dot products), so
8 bytes of side data per block: 6 bits per weight at block 32, 5 at 64, 4.5 at 128. llama.cpp's
q4_0 holds 4.5 (blocks of 32, one fp16 scale). If the kernel is bound by bytes, its rate in GB/s
is the same at every block size, and q4_0's bytes at that rate give the time a step's MatMuls
would take in q4_0's layout. Prints the table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from cpm_deploy.exporter.config import PRESETS
from cpm_deploy.optimize.quantize import quantize_matmuls
from cpm_deploy.runtime.system import huge_pages
from cpm_deploy.runtime.backends.session import create_session

Q4_0_BITS = 4.5  # llama.cpp q4_0: 32 weights in 16 bytes plus an fp16 scale


def packed_bits(block: int) -> float:
    return 4 + 8 * 8 / block  # 4-bit data, then an fp32 scale and an fp32 block sum per block


def step_matmuls(preset: str) -> list[tuple[int, int]]:
    """(K, N) of every MatMul in one decode step."""
    c = PRESETS[preset]
    d = c.n_embd
    return [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * c.n_layer + [(d, c.vocab_size)]


def graph(shapes: list[tuple[int, int]], block: int) -> bytes:
    """The step's MatMuls on random fp32 weights, quantized by the export's own 4-bit recipe."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, inputs, outputs = [], [], {}, []
    for i, (k, n) in enumerate(shapes):
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n), np.float32), f"w{i}"))
        inputs.setdefault(k, helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, 1, k]))
        nodes.append(helper.make_node("MatMul", [f"x{k}", f"w{i}"], [f"y{i}"], name=f"m{i}"))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 1, n]))
    g = helper.make_graph(nodes, "step_matmuls", list(inputs.values()), outputs, inits)
    model, count = quantize_matmuls(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), 4, block)
    assert count == len(shapes), f"{count} of {len(shapes)} MatMuls quantized"
    return model.SerializeToString()


class StepMatmuls:
    def __init__(self, shapes: list[tuple[int, int]], block: int, threads: int):
        before = huge_pages.snapshot()
        # as the runtime's cpu-int4 sessions: threads stop spinning when a run returns (else this
        # graph's idle threads take the cores from the next one's)
        self.session = create_session(graph(shapes, block), "cpu", threads, spin_after_run=False)
        collapse = huge_pages.collapse_since(before)
        if collapse is not None:
            collapse.join()
        self.binding = self.session.io_binding()
        for k in {k for k, _ in shapes}:
            self.binding.bind_cpu_input(f"x{k}", np.random.default_rng(k).random((1, 1, k), np.float32))
        for i in range(len(shapes)):
            self.binding.bind_output(f"y{i}", "cpu")
        self.run(5)

    def run(self, times: int) -> float:
        t0 = time.perf_counter()
        for _ in range(times):
            self.session.run_with_iobinding(self.binding)
        return (time.perf_counter() - t0) / times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--block-sizes", type=lambda v: [int(b) for b in v.split(",")], default=[32, 64, 128])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--calls", type=int, default=20, help="runs per timing")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "int4_kernel.json")
    args = ap.parse_args()

    shapes = step_matmuls(args.preset)
    weights = sum(k * n for k, n in shapes)
    graphs = {b: StepMatmuls(shapes, b, args.threads) for b in args.block_sizes}
    times = {b: [] for b in graphs}
    for _ in range(args.repeats):
        for b, g in graphs.items():
            g.run(3)  # back into cache after the other graphs' turns: decoding runs one graph back to back
            times[b].append(g.run(args.calls))
    rows = []
    for b in graphs:
        ms = statistics.median(times[b]) * 1e3
        mb = weights * packed_bits(b) / 8 / 1e6
        rate = mb / ms  # GB/s
        rows.append({"block": b, "ms": round(ms, 3), "packed_bits_per_weight": packed_bits(b), "packed_mb": round(mb, 1),
                     "gb_per_s": round(rate, 1), "ms_at_q4_0_bytes": round(weights * Q4_0_BITS / 8 / 1e6 / rate, 3)})
    print(f"{args.preset}: one decode step's {len(shapes)} MatMuls, {weights / 1e6:.1f}M weights, batch 1, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"{'block':>5} {'ms':>7} {'bits/w':>6} {'MB':>6} {'GB/s':>6} {'ms at q4_0 bytes':>17}")
    for r in rows:
        print(f"{r['block']:>5} {r['ms']:>7.3f} {r['packed_bits_per_weight']:>6.2f} {r['packed_mb']:>6.1f} "
              f"{r['gb_per_s']:>6.1f} {r['ms_at_q4_0_bytes']:>17.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"preset": args.preset, "threads": args.threads, "repeats": args.repeats,
                                    "weights": weights, "q4_0_bits_per_weight": Q4_0_BITS, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
