"""cpm-serve: an OpenAI-compatible completions server over a bundle, with continuous batching."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import click

from ..serve.config import default
from .common import setup_logging, user_errors

CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-H", "--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback exposes the model to the network.")
@click.option("-p", "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("-g", "--graph", help="Graph of the bundle (a shared-KV one: cpu-fp32, cpu-int8, cpu-int4); default: the bundle's.")
@click.option("-b", "--max-batch", type=click.IntRange(1, 256), default=default("max_batch"), show_default=True,
              help="Sequences decoded together; the KV pool holds this many, allocated once.")
@click.option("-q", "--max-queue", type=click.IntRange(0), default=default("max_queue"), show_default=True,
              help="Requests that may wait for a slot; beyond it the server answers 429 with Retry-After.")
@click.option("--max-total", type=click.IntRange(2), help="Positions per sequence (prompt + new tokens) in the KV pool; "
              "default: the model's (1024). Lower it to shrink the pool.")
@click.option("--prefill-tokens", type=click.IntRange(1), default=default("prefill_tokens"), show_default=True,
              help="The prefill chunk: prompt tokens prefilled between two decode steps while streams run, so a "
                   "long prompt delays each running stream by one chunk, not its whole length. Lower keeps streams "
                   "smoother, higher prefills long prompts sooner.")
@click.option("--prefix-cache-tokens", type=click.IntRange(0),
              help="Prompt positions kept for reuse (default: twice --max-total): a prompt that begins like an "
                   "earlier one (a few-shot template, a shared instruction) starts from its cached KV and prefills "
                   "only the rest. Least recently used prefixes go first; the memory check counts them.")
@click.option("--no-prefix-cache", is_flag=True, help="Prefill every prompt whole (no reuse; same as --prefix-cache-tokens 0).")
@click.option("-t", "--threads", type=click.IntRange(1), help="onnxruntime intra-op threads (default: all cores).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=default("timeout_s"), show_default=True,
              help="Seconds a request may take, queueing included.")
@click.option("--drain", "drain_s", type=click.FloatRange(min=0), default=default("drain_s"), show_default=True,
              help="On SIGTERM: seconds open requests get to finish before they are cancelled.")
@click.option("--model-name", help="Model id in the API (default: the bundle folder's name).")
@click.option("--api-key", envvar="CPM_SERVE_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' (the openai client's api_key) on every route but /health. "
                   "Prefer the environment variable: an option shows in process listings.")
@click.option("--open-metrics", is_flag=True, help="Serve /metrics without the API key (for a scraper).")
@click.option("--no-playground", is_flag=True, help="Serve no playground page at / (the API alone).")
@click.option("--no-warm-up", is_flag=True, help="Report ready after one first run instead of after running every "
                                                  "batch shape once (faster start, slower first burst).")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the graph's files (paths are still checked).")
@click.option("-v", "--verbose", is_flag=True, help="Log every request.")
def main(bundle, host, port, graph, max_batch, max_queue, max_total, prefill_tokens, prefix_cache_tokens, no_prefix_cache,
         threads, timeout_s, drain_s, model_name, api_key, open_metrics, no_playground, no_warm_up, no_verify, verbose):
    """Serve the model in BUNDLE over OpenAI's completions API.

    Routes: POST /v1/completions (streaming with "stream": true; logprobs and echo), GET /v1/models,
    POST /tokenize, POST /detokenize, GET /tokenizer_info, GET /health (ready once the bundle is
    loaded), GET /metrics (Prometheus), and GET / (a playground page: open it in a browser).
    Requests join the running batch at the next decode step and leave it when they finish. SIGTERM stops accepting, lets
    open requests finish within --drain seconds, and exits 0.

    \b
    Examples:
      cpm-serve ./cpm-bundle
      cpm-serve ./cpm-bundle -g cpu-int8 --max-batch 32 --port 8080
      cpm-serve ./cpm-bundle --prefix-cache-tokens 4096 --prefill-tokens 32   # long few-shot prompts
      curl -s 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
           -d '{"prompt": "清华大学", "max_tokens": 32}'
    """
    setup_logging(verbose)
    for name in ("cpm_deploy.serve", "cpm_deploy.engine"):  # startup and failures, one line each
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        from ..serve.app import run
    except ImportError as e:
        raise click.ClickException(f"serving needs the [serve] extra (pip install 'cpm-deploy[serve]'): {e}") from None
    from ..runtime import BundleError, Bundle
    from ..serve.config import ServerConfig

    with user_errors():  # mistakes fail here, before the port opens
        b = Bundle.open(bundle, verify=False)
        name = graph or b.default_graph
        if b.graph(name).get("kv_cache") != "shared":
            shared = [k for k, g in b.manifest["graphs"].items() if g.get("kv_cache") == "shared"]
            raise BundleError(f"graph {name} concatenates its KV cache; continuous batching needs a shared-KV graph "
                              f"({', '.join(shared) or 'none in this bundle: export with -P fp32/int8/int4'})")
    if api_key is not None and not api_key.strip():
        raise click.UsageError("--api-key is empty")
    if not _is_loopback(host) and api_key is None:
        click.echo(f"warning: listening on {host} without an API key: anyone who reaches the port is served "
                   "(set CPM_SERVE_API_KEY)", err=True)
    config = ServerConfig(bundle, graph=graph, threads=threads, max_batch=max_batch, max_queue=max_queue,
                          max_total=max_total, prefill_tokens=prefill_tokens,
                          prefix_cache_tokens=0 if no_prefix_cache else prefix_cache_tokens, timeout_s=timeout_s, drain_s=drain_s,
                          model_name=model_name, verify=not no_verify, api_key=api_key, open_metrics=open_metrics,
                          playground=not no_playground,
                          warm_up=not no_warm_up)
    with user_errors():
        config.check_memory()
    run(config, host, port, verbose)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
