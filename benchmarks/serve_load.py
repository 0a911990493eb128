"""cpm-serve under load, against the runtime called the two ways a user would without it.

For each graph (CPM-Small shape, random weights; fp32 and int8 unless --graphs names others,
cpu-int4 among them) and each client count C:
  serve    - cpm-serve (a separate process, all cores), C concurrent streaming clients (httpx),
             each sending one headline and reading 64 new tokens (greedy; --top-p P samples
             with temperature 1 and top-p P instead, in every system);
  threads  - (a) one CPMGenerator in this process, one thread per request, streaming;
  offline  - (b) the same C prompts as ONE batched generate call.
Each measured run follows an unmeasured one of the same size, except the "first burst": the
largest client count sent the moment a fresh server reports ready (what its first users meet).
Reported: aggregate tokens/s, time to first token p50/p95, inter-token latency p50/p95, and
the ratios the goals name (serve vs threads and vs offline at each C; TTFT at C vs one client).
--llama-gguf LABEL=FILE starts llama-server (--llama-bin; benchmarks/peers/build_llama_cpp.sh builds
it and converts the checkpoint) on the same weights as GGUF and loads it the same way, prompts sent
as CPM token ids; --llama-server LABEL=URL uses one already running. --bundle serves an existing
bundle (CPM-Large, say) instead of exporting a random CPM-Small. Peak RSS is each server's VmHWM.

    python benchmarks/serve_load.py --workdir /tmp/serve-load [--clients 1 4 16 64]
Prints a table and writes benchmarks/out/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

NEW_TOKENS = 64
WARM_UP = 4000  # warm-up prompts come from here on in the corpus


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def summary(kind: str, graph: str, clients: int, wall: float, tokens: int, ttft: list[float], itl: list[float]) -> dict:
    return {"system": kind, "graph": graph, "clients": clients, "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "ttft_p50_ms": round(1000 * pct(ttft, 0.5), 1),
            "ttft_p95_ms": round(1000 * pct(ttft, 0.95), 1), "itl_p50_ms": round(1000 * pct(itl, 0.5), 1),
            "itl_p95_ms": round(1000 * pct(itl, 0.95), 1)}


def request_fields(top_p: float | None) -> dict:
    return {"temperature": 0} if top_p is None else {"temperature": 1.0, "top_p": top_p}


def runtime_sampling(top_p: float | None) -> dict:
    return {} if top_p is None else {"do_sample": True, "top_p": top_p}


async def _client(http, url: str, model: str, prompt: str | list[int], fields: dict, out: list) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "stream": True, **fields,
            "stream_options": {"include_usage": True}, "ignore_eos": True}  # ignore_eos: llama-server's field
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    async with http.stream("POST", url, json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    out.append((t0, stamps, tokens or len(stamps)))


def run_http(base: str, model: str, prompts: list, kind: str, graph: str, fields: dict) -> dict:
    import httpx

    async def main():
        out = []
        limits = httpx.Limits(max_connections=len(prompts) + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as http:
            t0 = time.perf_counter()
            await asyncio.gather(*[_client(http, f"{base}/v1/completions", model, p, fields, out) for p in prompts])
            return time.perf_counter() - t0, out

    wall, out = asyncio.run(main())
    ttft = [s[0] - t0 for t0, s, _ in out if s]
    itl = [b - a for _, s, _ in out for a, b in zip(s, s[1:])]
    return summary(kind, graph, len(prompts), wall, sum(n for *_, n in out), ttft, itl)


def run_threads(gen, prompts: list[str], graph: str, sampling: dict) -> dict:
    out = []

    def one(p):
        t0, stamps = time.perf_counter(), []
        for _ in gen.stream(p, max_new_tokens=NEW_TOKENS, **sampling):
            stamps.append(time.perf_counter())
        out.append((t0, stamps))

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [s[0] - a for a, s in out if s]
    itl = [b - a for _, s in out for a, b in zip(s, s[1:])]
    return summary("threads (a)", graph, len(prompts), wall, NEW_TOKENS * len(prompts), ttft, itl)


def run_offline(gen, prompts: list[str], graph: str, sampling: dict) -> dict:
    from cpm_deploy.runtime import SamplingConfig

    ids = [gen.tokenizer.encode(p) for p in prompts]
    t0, stamps = time.perf_counter(), []
    for _ in gen.iter_ids(ids, NEW_TOKENS, 1, SamplingConfig(**sampling)):
        stamps.append(time.perf_counter())
    wall = time.perf_counter() - t0
    return summary("offline batch (b)", graph, len(prompts), wall, NEW_TOKENS * len(prompts), [stamps[0] - t0],
                   [b - a for a, b in zip(stamps, stamps[1:])])


def start_server(bundle: Path, graph: str, port: int, max_batch: int, threads: int, prefill: int,
                 max_total: int) -> tuple[subprocess.Popen, float]:
    cmd = [str(Path(sys.executable).parent / "cpm-serve"), str(bundle), "-g", graph, "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", "256", "--max-total", str(max_total), "-t", str(threads),
           "--no-verify", "--prefill-tokens", str(prefill)]
    return wait_ready(subprocess.Popen(cmd, stderr=subprocess.DEVNULL), port, "cpm-serve")


def start_llama_server(binary: Path, gguf: Path, port: int, clients: int, threads: int,
                       max_total: int) -> tuple[subprocess.Popen, float]:
    cmd = [str(binary), "-m", str(gguf), "--port", str(port), "--host", "127.0.0.1", "-t", str(threads),
           "-np", str(clients), "-c", str(clients * max_total), "--no-webui"]
    return wait_ready(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port, "llama-server")


def wait_ready(proc: subprocess.Popen, port: int, what: str, timeout: float = 1200) -> tuple[subprocess.Popen, float]:
    """The process once /health answers 200, and the seconds that took."""
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{what} did not become ready")


def peak_rss_gb(proc: subprocess.Popen) -> float:
    status = Path(f"/proc/{proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 2**20


def load(base: str, model: str, kind: str, graph: str, fields: dict, clients: list[int], encode=None) -> list:
    """A first burst of the largest client count right away, then each count after a warm-up of its size."""
    def ps(n, offset=0):
        return [encode(p) if encode else p for p in headlines(n, offset)]

    rows = [dict(run_http(base, model, ps(max(clients), 2 * WARM_UP), kind, graph, fields), first_burst=True)]
    print(rows[-1], flush=True)
    for c in clients:
        run_http(base, model, ps(c, WARM_UP), "warm-up", graph, fields)
        rows.append(run_http(base, model, ps(c), kind, graph, fields))
        print(rows[-1], flush=True)
    return rows


def ensure_bundle(workdir: Path, graphs: list[str]) -> Path:
    from cpm_deploy.exporter import ExportOptions, export_bundle
    from cpm_deploy.exporter.checkpoint_tools import write_random_checkpoint
    from cpm_deploy.exporter.config import CPMConfig
    from cpm_deploy.runtime import Bundle
    from cpm_deploy.runtime.text.tokenizer import DEFAULT_VOCAB

    bundle = workdir / "small-bundle"
    if not bundle.exists():
        unknown = [g for g in graphs if g not in ("cpu-fp32", "cpu-int8", "cpu-int4")]
        if unknown:
            sys.exit(f"serve_load exports cpu-fp32, cpu-int8 and cpu-int4 only, not {', '.join(unknown)}")
        write_random_checkpoint(CPMConfig.from_preset("small"), workdir / "small-ckpt", seed=0, tokenizer=DEFAULT_VOCAB,
                                overwrite=True)
        variants = tuple(("cpu", g.split("-")[1]) for g in graphs)
        export_bundle(workdir / "small-ckpt", bundle, ExportOptions(variants=variants))
    else:  # exported by whatever code ran before: say so, a stale bundle measures old graphs
        print(f"reusing {bundle}; delete it to export with this code", flush=True)
        missing = [g for g in graphs if g not in Bundle.open(bundle, verify=False).manifest["graphs"]]
        if missing:
            sys.exit(f"{bundle} has no {', '.join(missing)}; delete it to export again")
    return bundle


def headlines(n: int, offset: int = 0) -> list[str]:
    """n prompts; warm-ups use another offset, so a server's prompt cache (llama-server has one)
    never sees a measured prompt in advance."""
    corpus = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "tnews-headlines.txt"
    lines = corpus.read_text(encoding="utf-8").splitlines() if corpus.is_file() else [
        f"第{i}条新闻：清华大学是中国著名的高等学府" for i in range(1000)]
    return [lines[(offset + i) % len(lines)][:24] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--graphs", nargs="*", default=["cpu-fp32", "cpu-int8"])
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--port", type=int, default=8179)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--max-total", type=int, default=160, help="positions per sequence in each server's KV cache")
    ap.add_argument("--bundle", type=Path, help="serve this bundle instead of a random CPM-Small exported into --workdir")
    ap.add_argument("--llama-bin", type=Path, help="llama-server, for --llama-gguf")
    ap.add_argument("--llama-gguf", action="append", default=[], metavar="LABEL=FILE",
                    help="start llama-server on FILE and load it the same way (repeatable)")
    ap.add_argument("--serve-only", action="store_true", help="skip the two runtime baselines (quick tuning runs)")
    ap.add_argument("--llama-server", action="append", default=[], metavar="LABEL=URL",
                    help="a running llama-server to load the same way, e.g. 'llama f32=http://127.0.0.1:8190' (repeatable)")
    ap.add_argument("--top-p", type=float, default=None, metavar="P",
                    help="sample (temperature 1, top-p P) instead of greedy decoding, in every system")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "serve_load.json")
    args = ap.parse_args()
    fields, sampling = request_fields(args.top_p), runtime_sampling(args.top_p)
    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or ensure_bundle(args.workdir, args.graphs)

    from cpm_deploy.runtime import CPMGenerator

    rows = []
    for graph in args.graphs:
        proc, ready_s = start_server(bundle, graph, args.port, args.max_batch, args.threads, args.prefill_tokens,
                                     args.max_total)
        try:
            served = load(f"http://127.0.0.1:{args.port}", bundle.name, "cpm-serve", graph, fields, args.clients)
            rows += [r | {"ready_s": round(ready_s, 1), "peak_rss_gb": round(peak_rss_gb(proc), 2)} for r in served]
        finally:
            proc.terminate()
            proc.wait(60)
        if args.serve_only:
            continue
        gen = CPMGenerator.from_bundle(bundle, variant=graph, threads=args.threads, verify=False)
        gen.eod_id = -1  # exactly 64 tokens each, as the server's random-weight runs produce
        for c in args.clients:
            run_offline(gen, headlines(c, WARM_UP), graph, sampling)
            rows.append(run_threads(gen, headlines(c), graph, sampling))
            print(rows[-1], flush=True)
            rows.append(run_offline(gen, headlines(c), graph, sampling))
            print(rows[-1], flush=True)
    from cpm_deploy.runtime import CPMTokenizer
    from cpm_deploy.runtime.text.tokenizer import DEFAULT_VOCAB

    encode = CPMTokenizer(DEFAULT_VOCAB).encode  # a GGUF has no CPM tokenizer: prompts go in as CPM token ids
    for spec in args.llama_server:
        label, _, url = spec.partition("=")
        rows += load(url, "model", label, "gguf", fields, args.clients, encode)
    for spec in args.llama_gguf:
        label, _, file = spec.partition("=")
        proc, ready_s = start_llama_server(args.llama_bin, Path(file), args.port + 1, max(args.clients), args.threads,
                                           args.max_total)
        try:
            served = load(f"http://127.0.0.1:{args.port + 1}", "model", label, "gguf", fields, args.clients, encode)
            rows += [r | {"ready_s": round(ready_s, 1), "peak_rss_gb": round(peak_rss_gb(proc), 2)} for r in served]
        finally:
            proc.terminate()
            proc.wait(60)
    report(rows, args.out, args.top_p)


def report(rows: list[dict], out: Path, top_p: float | None = None) -> None:
    print(f"\n{'system':<20}{'graph':<10}{'C':>5}{'tok/s':>9}{'TTFT p50':>10}{'p95':>8}{'ITL p50':>9}{'p95':>8}"
          f"{'RSS GB':>8}")
    for r in rows:
        c = f"{r['clients']}{'*' if r.get('first_burst') else ''}"
        print(f"{r['system']:<20}{r['graph']:<10}{c:>5}{r['tokens_per_s']:>9.1f}{r['ttft_p50_ms']:>10.0f}"
              f"{r['ttft_p95_ms']:>8.0f}{r['itl_p50_ms']:>9.1f}{r['itl_p95_ms']:>8.1f}{r.get('peak_rss_gb', float('nan')):>8.2f}")
    print("* the first burst, sent the moment the server reported ready")
    ratios = []
    for r in (r for r in rows if r["system"] == "cpm-serve" and not r.get("first_burst")
              and any(x["system"] == "threads (a)" for x in rows)):
        same = {x["system"]: x for x in rows if x["graph"] == r["graph"] and x["clients"] == r["clients"]
                and not x.get("first_burst")}
        idle = next(x for x in rows if x["system"] == "cpm-serve" and x["graph"] == r["graph"] and x["clients"] == min(
            y["clients"] for y in rows if y["system"] == "cpm-serve"))
        ratios.append({"graph": r["graph"], "clients": r["clients"],
                       "vs_threads": round(r["tokens_per_s"] / same["threads (a)"]["tokens_per_s"], 2),
                       "vs_offline": round(r["tokens_per_s"] / same["offline batch (b)"]["tokens_per_s"], 2),
                       "ttft_vs_idle": round(r["ttft_p50_ms"] / idle["ttft_p50_ms"], 2)})
    print(f"\n{'graph':<10}{'C':>4}{'serve/threads':>15}{'serve/offline':>15}{'TTFT/idle':>11}")
    for x in ratios:
        print(f"{x['graph']:<10}{x['clients']:>4}{x['vs_threads']:>15.2f}{x['vs_offline']:>15.2f}{x['ttft_vs_idle']:>11.2f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    bursts = burst_ratios(rows)
    for b in bursts:
        print(f"{b['system']} {b['graph']}: first burst {b['first_vs_warm_tokens']:.2f}x the warm burst's tokens/s, "
              f"TTFT p50 {b['first_vs_warm_ttft']:.2f}x warm; warm TTFT p50 {b['warm_ttft_vs_idle']:.2f}x idle")
    out.write_text(json.dumps({"new_tokens": NEW_TOKENS, "top_p": top_p, "rows": rows, "ratios": ratios, "bursts": bursts,
                               "median_itl_ms": statistics.median([r["itl_p50_ms"] for r in rows])}, indent=2) + "\n")


def burst_ratios(rows: list[dict]) -> list[dict]:
    """Per server: the first burst against the warm burst of the same size, and that against one client."""
    out = []
    for first in (r for r in rows if r.get("first_burst")):
        same = [r for r in rows if r["system"] == first["system"] and r["graph"] == first["graph"]
                and not r.get("first_burst")]
        warm = next((r for r in same if r["clients"] == first["clients"]), None)
        idle = min(same, key=lambda r: r["clients"], default=None)
        if warm and idle:
            out.append({"system": first["system"], "graph": first["graph"], "clients": first["clients"],
                        "first_vs_warm_tokens": round(first["tokens_per_s"] / warm["tokens_per_s"], 2),
                        "first_vs_warm_ttft": round(first["ttft_p50_ms"] / warm["ttft_p50_ms"], 2),
                        "warm_ttft_vs_idle": round(warm["ttft_p50_ms"] / idle["ttft_p50_ms"], 2)})
    return out


if __name__ == "__main__":
    main()
