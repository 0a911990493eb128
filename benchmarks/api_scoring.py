"""Scoring over the API against scoring in process (issue #27's goals), on a random CPM-Small:

  cpm-eval    - TNEWS examples (the card's four candidates) through the graph's one-pass scorer, in
                this process: examples/s;
  lm-eval     - the same examples as lm-evaluation-harness's local-completions client sends them to
                cpm-serve (echo, logprobs 1, max_tokens 1; --num-concurrent requests in flight of
                --batch-size prompts each, tokens from the server's /tokenize): examples/s, counted
                after lm-eval's own start-up (a run of 8 examples measures that), and whether the
                predictions match;
  logprobs    - the engine decoding 16 greedy requests x 64 tokens with and without logprobs 5,
                alternating runs: tokens/s each, and the cost of the log-probabilities.

    python benchmarks/api_scoring.py --workdir /tmp/api-scoring [--examples 200] [--graph cpu-int8]
Prints a table and writes benchmarks/out/api_scoring.json. Needs ../shared/corpus (TNEWS dev).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "lm_eval"))
from make_tnews_docs import write_docs  # noqa: E402
from serve_load import ensure_bundle, wait_ready  # noqa: E402

CORPUS = HERE.resolve().parents[1] / "shared" / "corpus"


def tnews_folder(workdir: Path) -> Path:
    folder = workdir / "tnews"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CORPUS / "tnews-dev.jsonl", folder / "dev.json")
    shutil.copyfile(CORPUS / "tnews-labels.jsonl", folder / "labels.json")
    return folder


def cpm_eval(bundle: Path, graph: str, folder: Path, examples: int) -> tuple[float, list[int]]:
    from cpm_deploy.runtime import CPMTokenizer
    from cpm_deploy.runtime.eval import classify, encode_examples, load_task, open_scorer

    scorer = open_scorer(bundle, graph, "one-pass")
    task = load_task("tnews", folder, limit=examples)
    encoded = encode_examples(task, CPMTokenizer(bundle / "spiece.model"), 1024)
    classify(scorer, encoded[:16])  # first-run costs
    t0 = time.perf_counter()
    predictions = classify(scorer, encoded)["predictions"]
    return examples / (time.perf_counter() - t0), predictions


def lm_eval(bundle: Path, graph: str, folder: Path, workdir: Path, examples: int, concurrent: int, batch: int,
            port: int) -> tuple[float, float, list[int]]:
    """examples/s after lm-eval's start-up, the whole run's, and the predictions."""
    task = workdir / "task"
    task.mkdir(exist_ok=True)
    shutil.copyfile(HERE / "lm_eval" / "tnews_cpm.yaml", task / "tnews_cpm.yaml")
    cmd = [str(Path(sys.executable).parent / "cpm-serve"), str(bundle), "-g", graph, "--port", str(port), "--no-verify"]
    proc, _ = wait_ready(subprocess.Popen(cmd, stderr=subprocess.DEVNULL), port, "cpm-serve")
    try:
        args = (f"model={bundle.name},base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=remote,"
                f"max_length=1024,num_concurrent={concurrent}")
        env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        walls = {}
        for n in (8, examples):
            write_docs(folder, task / "tnews_cpm.jsonl", n)
            shutil.rmtree(task / "out", ignore_errors=True)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--tasks", "tnews_cpm",
                            "--include_path", str(task), "--model_args", args, "--batch_size", str(batch),
                            "--log_samples", "--output_path",
                            str(task / "out")], cwd=task, env=env, check=True, capture_output=True)
            walls[n] = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(60)
    samples = [json.loads(line) for f in (task / "out").rglob("samples_tnews_cpm_*.jsonl")
               for line in f.read_text(encoding="utf-8").splitlines()]
    by_doc = {s["doc_id"]: max(range(4), key=lambda i: float(s["filtered_resps"][i][0])) for s in samples}
    return (examples - 8) / (walls[examples] - walls[8]), examples / walls[examples], [by_doc[i] for i in range(examples)]


def logprobs_cost(bundle: Path, graph: str, rounds: int) -> dict:
    from cpm_deploy.engine import Engine

    prompts = [f"第{i}条新闻：清华大学是中国著名的高等学府" for i in range(16)]
    with Engine.from_bundle(bundle, graph=graph, max_batch=16, verify=False) as engine:
        engine.generator.eod_id = -1  # 64 tokens each

        def run(logprobs):
            reqs = [engine.submit(engine.make_request(p, 64, logprobs=logprobs)) for p in prompts]
            t0 = time.perf_counter()
            while not all(r.finished for r in reqs):
                time.sleep(0.001)
            return 16 * 64 / (time.perf_counter() - t0)

        run(None), run(5)  # warm
        plain, with_lp = [], []
        for _ in range(rounds):
            plain.append(run(None))
            with_lp.append(run(5))
    p, w = statistics.median(plain), statistics.median(with_lp)
    return {"tokens_per_s": p, "with_logprobs_5": w, "cost": 1 - w / p, "rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, help="default: a random CPM-Small exported into --workdir")
    ap.add_argument("--graph", default="cpu-int8")
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--num-concurrent", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4, help="prompts per lm-eval request")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--port", type=int, default=8199)
    ap.add_argument("--out", type=Path, default=HERE / "out" / "api_scoring.json")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or ensure_bundle(args.workdir, [args.graph])
    folder = tnews_folder(args.workdir)
    ours_rate, ours = cpm_eval(bundle, args.graph, folder, args.examples)
    api_rate, api_whole, api = lm_eval(bundle, args.graph, folder, args.workdir, args.examples, args.num_concurrent,
                                       args.batch_size, args.port)
    cost = logprobs_cost(bundle, args.graph, args.rounds)
    result = {"graph": args.graph, "examples": args.examples, "num_concurrent": args.num_concurrent,
              "batch_size": args.batch_size, "cpm_eval_examples_per_s": ours_rate, "lm_eval_examples_per_s": api_rate,
              "lm_eval_whole_run_examples_per_s": api_whole,
              "lm_eval_vs_cpm_eval": api_rate / ours_rate,
              "same_predictions": sum(a == b for a, b in zip(ours, api)) / len(ours), "decode": cost}
    print(f"\n{'':<34}{'examples/s':>12}\ncpm-eval (in process){'':<13}{ours_rate:>12.1f}\n"
          f"lm-eval local-completions {args.num_concurrent} x {args.batch_size}{'':<3}{api_rate:>12.1f}   "
          f"({api_rate / ours_rate:.2f}x after lm-eval's start-up, {api_whole:.1f} over the whole run; "
          f"predictions equal on {result['same_predictions']:.1%})\n"
          f"decode, 16 x 64 greedy: {cost['tokens_per_s']:.0f} tok/s plain, {cost['with_logprobs_5']:.0f} with "
          f"logprobs 5 (cost {cost['cost']:.1%})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
