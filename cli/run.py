"""cpm-run: generate text from a cpm-export bundle."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import ray_options, setup_logging, user_errors

CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt", required=False)
@click.option("-n", "--max-new-tokens", type=int, help="Tokens to generate (default 50).")
@click.option("-l", "--max-length", type=int, help="Total length including the prompt, as in transformers.")
@click.option("-s", "--sample", "do_sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("-t", "--temperature", type=float, default=1.0, show_default=True, help="Softmax temperature (with --sample).")
@click.option("-k", "--top-k", type=int, default=0, show_default=True, help="Keep the k most likely tokens; 0 = off.")
@click.option("-p", "--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass; 1 = off.")
@click.option("-r", "--repetition-penalty", type=float, default=1.0, show_default=True, help="CTRL-style penalty; 1 = off.")
@click.option("--seed", type=int, help="Seed for reproducible sampling.")
@click.option("-N", "--num-return-sequences", type=int, default=1, show_default=True, help="Continuations per prompt (with --sample).")
@click.option("--stop", multiple=True, help="Stop when this string appears (repeatable); <eod> always stops.")
@click.option("-f", "--prompts-file", type=click.Path(dir_okay=False, allow_dash=True),
              help="A file of prompts ('-' for stdin), run through the batching engine; writes JSON lines in "
                   "input order. Lines: plain prompts, JSON objects with a \"prompt\" and per-line options "
                   "(max_new_tokens, temperature, seed, ...), or OpenAI batch lines (custom_id, body).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="With -f: append records to this file, each flushed when done; run the same command again "
                   "after a crash or kill and it finishes what is missing.")
@click.option("--format", "file_format", type=click.Choice(["auto", "text", "jsonl", "openai-batch"]), default="auto",
              show_default=True, help="With -f: the lines' format (auto: from the first line).")
@click.option("-b", "--max-batch", type=click.IntRange(1, 256), default=16, show_default=True,
              help="With -f: sequences generated together.")
@click.option("-q", "--quiet", is_flag=True, help="With -f: no progress bar (shown when stderr is a terminal).")
@ray_options("With -f: the prompts, one engine per worker,")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help="onnxruntime execution provider.")
@click.option("-g", "--graph", help="Graph variant of the bundle (e.g. cpu-int4); default: the bundle's default.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="tensorrt runs the bundle's engine for this GPU (built with cpm-trt build).")
@click.option("--threads", type=click.IntRange(1), help="onnxruntime intra-op threads (default: all cores).")
@click.option("--truncate-prompt", is_flag=True, help="Drop the start of prompts that are too long instead of failing.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle files (sizes are still checked).")
@click.option("--benchmark", is_flag=True, help="Print prompt tokens/s, decode tokens/s, time to first token, peak memory.")
def main(bundle, prompt, max_new_tokens, max_length, do_sample, temperature, top_k, top_p, repetition_penalty,
         seed, num_return_sequences, stop, prompts_file, output, file_format, max_batch, quiet, ray_address, workers,
         worker_cpus, provider, graph, backend, threads, truncate_prompt, no_verify, benchmark):
    """Generate a continuation of PROMPT with the model in BUNDLE, streamed to stdout.

    Without PROMPT, prompts are read from --prompts-file or stdin and run together through the
    continuous-batching engine; each result is a JSON line, in input order:
    {"prompt": ..., "generated_text": [...]}, or for OpenAI batch lines {"custom_id", "response", ...}
    with the body cpm-serve would answer. A line that cannot be served gets a record saying why.

    \b
    Examples:
      cpm-run ./cpm-bundle "清华大学"
      cpm-run ./cpm-bundle "天下是否太平" -n 100 --sample -p 0.9 --seed 1
      cpm-run ./cpm-bundle -f prompts.txt > out.jsonl
      cpm-run ./cpm-bundle -f batch_input.jsonl -o batch_output.jsonl -g cpu-int8
      cpm-run ./cpm-bundle "清华大学" --benchmark -n 128 --graph cpu-int4
    """
    setup_logging()
    from ..runtime import CPMGenerator, GenerationError, SamplingConfig
    from ..runtime.generation.requests import check_choices

    with user_errors(ValueError, FileNotFoundError):
        sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop))
        SamplingConfig(**sampling)  # validate before the (slow) model load
        try:  # before the (slow) model load
            check_choices(num_return_sequences, do_sample)
        except GenerationError as e:
            raise GenerationError(f"--num-return-sequences / --sample: {e}") from None
        if prompt is None and prompts_file is None:
            if sys.stdin is None or sys.stdin.isatty():
                raise click.UsageError("give a PROMPT, or prompts with --prompts-file / on stdin")
            prompts_file = "-"
        if output is not None and prompts_file is None:
            raise click.UsageError("--output goes with --prompts-file")
        lengths = dict(max_length=max_length, max_new_tokens=max_new_tokens, truncate_prompt=truncate_prompt)
        if prompt is None and not benchmark:
            from .run_file import open_job

            defaults = {k: v for k, v in (lengths | sampling | {"num_return_sequences": num_return_sequences}).items()
                        if v is not None}
            job = open_job(prompts_file, output, file_format, defaults)
            if ray_address:
                from .run_file import run_file_on_ray

                return run_file_on_ray(bundle, job, ray_address, workers, worker_cpus, graph, threads, max_batch,
                                       not no_verify, quiet)
        elif ray_address:
            raise click.UsageError("--ray goes with --prompts-file")
        gen = CPMGenerator.from_bundle(bundle, provider=provider, threads=threads, verify=not no_verify, variant=graph,
                                         backend=backend)
        if benchmark:
            _benchmark(gen, prompt or "清华大学", lengths, SamplingConfig(**sampling))
        elif prompt is not None and num_return_sequences == 1:
            for piece in gen.stream(prompt, **lengths, **sampling):
                click.echo(piece, nl=False)
            click.echo()
        elif prompt is not None:
            for item in gen(prompt, num_return_sequences=num_return_sequences, **lengths, **sampling):
                click.echo(item["generated_text"])
        else:
            from .run_file import run_file

            run_file(gen, job, max_batch, quiet, Path(bundle).name)


def _benchmark(gen, prompt, lengths, cfg):
    from ..runtime.generation.benchmark import measure

    req = gen.prepare([prompt], lengths["max_length"], lengths["max_new_tokens"], lengths["truncate_prompt"])
    r = measure(gen, req.prompts[0], req.max_new_tokens, cfg)
    click.echo(f"prompt tokens        {r['prompt_tokens']}")
    click.echo(f"new tokens           {r['new_tokens']}")
    click.echo(f"time to first token  {r['time_to_first_token_s'] * 1000:.1f} ms")
    click.echo(f"prompt tokens/s      {r['prompt_tokens_per_s']:.1f}")
    click.echo(f"decode tokens/s      {r['decode_tokens_per_s']:.1f}")
    click.echo(f"peak memory          {r['peak_rss_mb']:.0f} MB")
