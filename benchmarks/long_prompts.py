"""Long prompts against a server: a few-shot template shared by a burst, and long prompts arriving
while streams run (issue #26's two workloads), for cpm-serve and, with --llama-gguf, llama-server
on the same weights, one after the other in one run.

  lone      - one prompt of --prefix-len template tokens + a headline, nothing cached: its TTFT;
  burst 1   - --clients requests at once, each one shared template (another one) + its own headline,
              --new tokens each: TTFT p50 and wall;
  burst 2   - the same template, other headlines (the template is still cached, if the server caches);
  mid-stream - --streams clients streaming --stream-tokens tokens each; 1 s in, three --long-len
              prompts arrive 2 s apart: the streams' inter-token latency p50 / p99 / max, and the
              long prompts' TTFT.
Prompts go as CPM token ids (a GGUF has no CPM tokenizer), greedy. The texts each server returns
are checked against one another: the same greedy tokens with and without reuse, on every server.

    python benchmarks/long_prompts.py --workdir /tmp/lp                      # random CPM-Small, cpu-int8
    python benchmarks/long_prompts.py --bundle /data/large-int8 --graph cpu-int8 \\
        --llama-bin llama-server --llama-gguf q8_0=/data/large-q8_0.gguf
Prints a table and writes benchmarks/out/long_prompts.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import ensure_bundle, pct, peak_rss_gb, wait_ready  # noqa: E402 - the serving benchmarks' helpers


def corpus() -> list[str]:
    path = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "tnews-headlines.txt"
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else [
        f"第{i}条新闻：清华大学是中国著名的高等学府，位于北京市海淀区" for i in range(3000)]


class Prompts:
    """Token-id prompts: templates of n tokens from running text, headlines of ~20 tokens."""

    def __init__(self):
        from cpm_deploy.runtime import CPMTokenizer
        from cpm_deploy.runtime.text.tokenizer import DEFAULT_VOCAB

        self.encode, self.lines = CPMTokenizer(DEFAULT_VOCAB).encode, corpus()

    def template(self, n: int, start: int) -> list[int]:
        ids, i = [], start
        while len(ids) < n:
            ids += self.encode(self.lines[i % len(self.lines)] + "\n")
            i += 1
        return ids[:n]

    def headlines(self, count: int, start: int) -> list[list[int]]:
        return [self.encode(self.lines[(start + i) % len(self.lines)])[:20] for i in range(count)]


async def stream(http, url: str, prompt: list[int], new: int, out: list, delay: float = 0.0) -> None:
    await asyncio.sleep(delay)
    body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}  # ignore_eos: llama-server's field
    t0, stamps, text, cached = time.perf_counter(), [], "", None
    async with http.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or {}
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", cached)
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
                text += chunk["choices"][0]["text"]
    out.append({"t0": t0, "stamps": stamps, "text": text, "cached": cached})


def run(base: str, jobs: list[tuple[list[int], int, float]]) -> tuple[float, list[dict]]:
    """Each job (prompt, new tokens, delay) as its own streaming client; the wall and each result in job order."""
    import httpx

    async def main():
        results = [[] for _ in jobs]
        async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=len(jobs) + 4)) as http:
            t0 = time.perf_counter()
            await asyncio.gather(*[stream(http, f"{base}/v1/completions", p, n, results[i], d)
                                   for i, (p, n, d) in enumerate(jobs)])
            return time.perf_counter() - t0, [r[0] for r in results]

    return asyncio.run(main())


def ttft(results: list[dict]) -> list[float]:
    return [r["stamps"][0] - r["t0"] for r in results if r["stamps"]]


def workloads(base: str, system: str, p: Prompts, args) -> dict:
    row: dict = {"system": system}
    lone_prompt = p.template(args.prefix_len, 5000) + p.headlines(1, 7000)[0]
    run(base, [(p.template(40, 6000), 4, 0.0)])  # a first request: connection and first-run costs
    _, (lone,) = run(base, [(lone_prompt, args.new, 0.0)])
    row["lone_ttft_s"] = ttft([lone])[0]
    template = p.template(args.prefix_len, 0)
    for burst, start in (("burst1", 100), ("burst2", 200)):
        prompts = [template + h for h in p.headlines(args.clients, start)]
        wall, results = run(base, [(q, args.new, 0.0) for q in prompts])
        row[f"{burst}_ttft_p50_s"], row[f"{burst}_wall_s"] = statistics.median(ttft(results)), wall
        row[f"{burst}_cached_tokens_p50"] = statistics.median([r["cached"] or 0 for r in results])
        row[f"{burst}_texts"] = [r["text"] for r in results]
    streams = [(h, args.stream_tokens, 0.0) for h in p.headlines(args.streams, 300)]
    longs = [(p.template(args.long_len, 9000 + 500 * i), 16, 1.0 + 2.0 * i) for i in range(3)]
    _, results = run(base, streams + longs)
    itl = [b - a for r in results[:args.streams] for a, b in zip(r["stamps"], r["stamps"][1:])]
    row.update(itl_p50_ms=1000 * pct(itl, 0.5), itl_p99_ms=1000 * pct(itl, 0.99), itl_max_ms=1000 * max(itl),
               long_ttft_s=ttft(results[args.streams:]))
    row["long_ttft_p50_s"] = statistics.median(row["long_ttft_s"])
    row["stream_texts"] = [r["text"] for r in results]
    return row


def start_cpm_serve(bundle: Path, args, extra: list[str]) -> tuple[subprocess.Popen, float]:
    cmd = [str(Path(sys.executable).parent / "cpm-serve"), str(bundle), "-g", args.graph, "--port", str(args.port),
           "--max-batch", str(args.clients), "--max-queue", "256", "-t", str(args.threads), "--no-verify", *extra]
    return wait_ready(subprocess.Popen(cmd, stderr=subprocess.DEVNULL), args.port, "cpm-serve")


def start_llama_server(args, gguf: Path) -> tuple[subprocess.Popen, float]:
    cmd = [str(args.llama_bin), "-m", str(gguf), "--port", str(args.port + 1), "--host", "127.0.0.1",
           "-t", str(args.threads), "-np", str(args.clients), "-c", str(args.clients * 1024), "--no-webui"]
    return wait_ready(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), args.port + 1,
                      "llama-server")


def measure(start, base: str, system: str, p: Prompts, args) -> dict:
    proc, ready_s = start()
    try:
        row = workloads(base, system, p, args)
        print({k: v for k, v in row.items() if not k.endswith("texts")}, flush=True)
        return row | {"ready_s": round(ready_s, 1), "peak_rss_gb": round(peak_rss_gb(proc), 2)}
    finally:
        proc.terminate()
        proc.wait(120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, help="where a random CPM-Small is exported when --bundle is not given")
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--graph", default="cpu-int8")
    ap.add_argument("--clients", type=int, default=16, help="burst size, and the servers' slots")
    ap.add_argument("--prefix-len", type=int, default=600)
    ap.add_argument("--new", type=int, default=32, help="tokens each burst request generates")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--stream-tokens", type=int, default=160)
    ap.add_argument("--long-len", type=int, default=900)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--port", type=int, default=8189)
    ap.add_argument("--cpm-serve", action="append", default=[], metavar="LABEL=FLAGS",
                    help="a cpm-serve configuration to measure, e.g. 'no reuse=--no-prefix-cache --prefill-tokens 4096' "
                         "(repeatable; default: the defaults, and reuse and chunking off)")
    ap.add_argument("--llama-bin", type=Path)
    ap.add_argument("--llama-gguf", action="append", default=[], metavar="LABEL=FILE")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "long_prompts.json")
    args = ap.parse_args()
    if args.bundle is None:
        if args.workdir is None:
            ap.error("give --bundle, or --workdir to export a random CPM-Small there")
        args.workdir.mkdir(parents=True, exist_ok=True)
        args.bundle = ensure_bundle(args.workdir, [args.graph])
    p = Prompts()
    configs = [c.partition("=")[::2] for c in args.cpm_serve] or [
        ("cpm-serve", ""), ("cpm-serve, no reuse or chunks", "--no-prefix-cache --prefill-tokens 100000")]
    rows = []
    for label, flags in configs:
        rows.append(measure(lambda: start_cpm_serve(args.bundle, args, flags.split()), f"http://127.0.0.1:{args.port}",
                            label, p, args))
    for spec in args.llama_gguf:
        label, _, file = spec.partition("=")
        rows.append(measure(lambda: start_llama_server(args, Path(file)), f"http://127.0.0.1:{args.port + 1}",
                            f"llama-server {label}", p, args))
    report(rows, args)


def report(rows: list[dict], args) -> None:
    print(f"\n{'system':<34}{'lone TTFT':>10}{'b1 TTFT':>9}{'wall':>8}{'b2 TTFT':>9}{'wall':>8}"
          f"{'ITL p50':>9}{'p99':>8}{'max':>8}{'long TTFT':>10}{'RSS GB':>8}")
    for r in rows:
        print(f"{r['system']:<34}{r['lone_ttft_s']:>9.2f}s{r['burst1_ttft_p50_s']:>8.2f}s{r['burst1_wall_s']:>7.1f}s"
              f"{r['burst2_ttft_p50_s']:>8.2f}s{r['burst2_wall_s']:>7.1f}s{r['itl_p50_ms']:>7.0f}ms{r['itl_p99_ms']:>6.0f}ms"
              f"{r['itl_max_ms']:>6.0f}ms{r['long_ttft_p50_s']:>9.2f}s{r['peak_rss_gb']:>8.2f}")
    ours = rows[0]
    ratios = {"burst1_vs_lone": ours["burst1_ttft_p50_s"] / ours["lone_ttft_s"],
              "burst2_vs_lone": ours["burst2_ttft_p50_s"] / ours["lone_ttft_s"],
              "itl_p99_vs_p50": ours["itl_p99_ms"] / ours["itl_p50_ms"]}
    for r in rows[1:]:
        ratios[f"vs {r['system']}"] = {k: r[k] / ours[k] for k in ("burst1_ttft_p50_s", "burst2_ttft_p50_s",
                                                                    "itl_p99_ms", "long_ttft_p50_s")}
        pairs = [(a, b) for k in ("burst1_texts", "burst2_texts", "stream_texts") for a, b in zip(r[k], ours[k])]
        ratios[f"greedy texts equal to {r['system']}'s"] = sum(a == b for a, b in pairs) / len(pairs)
    print(json.dumps(ratios, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in settings.items()}, "rows": rows,
                                    "ratios": ratios}, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
