"""cpm-serve under load, against the runtime called the two ways a user would without it.

For each graph (CPM-Small shape, random weights; fp32 and int8 unless --graphs names others,
cpu-int4 among them) and each client count C:
  serve    - cpm-serve (a separate process, all cores), C concurrent streaming clients (httpx),
             each sending one headline and reading 64 new tokens (greedy; --top-p P samples
             with temperature 1 and top-p P instead, in every system);
  threads  - (a) one CPMGenerator in this process, one thread per request, streaming;
  offline  - (b) the same C prompts as ONE batched generate call.
Each measured run follows an unmeasured one of the same size (first-run allocations out of the way).
Reported: aggregate tokens/s, time to first token p50/p95, inter-token latency p50/p95, and
the ratios the goals name (serve vs threads and vs offline at each C; TTFT at C vs one client).
--llama-server LABEL=URL adds a running llama-server (OpenAI routes, the same weights as GGUF,
prompts sent as CPM token ids) as rows labelled LABEL; build and start it yourself.

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


def start_server(bundle: Path, graph: str, port: int, max_batch: int, threads: int, prefill: int) -> subprocess.Popen:
    import httpx

    cmd = [str(Path(sys.executable).parent / "cpm-serve"), str(bundle), "-g", graph, "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", "256", "--max-total", "160", "-t", str(threads), "--no-verify",
           "--prefill-tokens", str(prefill)]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("cpm-serve did not become ready")


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
    ap.add_argument("--serve-only", action="store_true", help="skip the two runtime baselines (quick tuning runs)")
    ap.add_argument("--llama-server", action="append", default=[], metavar="LABEL=URL",
                    help="a running llama-server to load the same way, e.g. 'llama f32=http://127.0.0.1:8190' (repeatable)")
    ap.add_argument("--top-p", type=float, default=None, metavar="P",
                    help="sample (temperature 1, top-p P) instead of greedy decoding, in every system")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "serve_load.json")
    args = ap.parse_args()
    fields, sampling = request_fields(args.top_p), runtime_sampling(args.top_p)
    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle = ensure_bundle(args.workdir, args.graphs)

    from cpm_deploy.runtime import CPMGenerator

    rows = []
    for graph in args.graphs:
        proc = start_server(bundle, graph, args.port, args.max_batch, args.threads, args.prefill_tokens)
        try:
            base = f"http://127.0.0.1:{args.port}"
            for c in args.clients:  # each measured run follows a warm-up of the same size (steady state)
                run_http(base, bundle.name, headlines(c, WARM_UP), "warm-up", graph, fields)
                rows.append(run_http(base, bundle.name, headlines(c), "cpm-serve", graph, fields))
                print(rows[-1], flush=True)
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
    for spec in args.llama_server:  # its GGUF has no CPM tokenizer: the same prompts go in as CPM token ids
        from cpm_deploy.runtime import CPMTokenizer
        from cpm_deploy.runtime.text.tokenizer import DEFAULT_VOCAB

        label, _, url = spec.partition("=")
        tok = CPMTokenizer(DEFAULT_VOCAB)
        for c in args.clients:
            run_http(url, "model", [tok.encode(p) for p in headlines(c, WARM_UP)], "warm-up", "gguf", fields)
            rows.append(run_http(url, "model", [tok.encode(p) for p in headlines(c)], label, "gguf", fields))
            print(rows[-1], flush=True)
    report(rows, args.out, args.top_p)


def report(rows: list[dict], out: Path, top_p: float | None = None) -> None:
    print(f"\n{'system':<20}{'graph':<10}{'C':>4}{'tok/s':>9}{'TTFT p50':>10}{'p95':>8}{'ITL p50':>9}{'p95':>8}")
    for r in rows:
        print(f"{r['system']:<20}{r['graph']:<10}{r['clients']:>4}{r['tokens_per_s']:>9.1f}{r['ttft_p50_ms']:>10.0f}"
              f"{r['ttft_p95_ms']:>8.0f}{r['itl_p50_ms']:>9.1f}{r['itl_p95_ms']:>8.1f}")
    ratios = []
    for r in (r for r in rows if r["system"] == "cpm-serve" and any(x["system"] == "threads (a)" for x in rows)):
        same = {x["system"]: x for x in rows if x["graph"] == r["graph"] and x["clients"] == r["clients"]}
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
    out.write_text(json.dumps({"new_tokens": NEW_TOKENS, "top_p": top_p, "rows": rows, "ratios": ratios,
                               "median_itl_ms": statistics.median([r["itl_p50_ms"] for r in rows])}, indent=2) + "\n")


if __name__ == "__main__":
    main()
