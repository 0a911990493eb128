"""CPMGenerator: text in, text out, on a cpm-export bundle with onnxruntime. No torch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle.reader import Bundle
from ..backends.ort_decoder import open_decoder
from .sampling import SamplingConfig, next_tokens
from ..text.text_stream import TextStream, cut_at_stop
from ..text.tokenizer import CPMTokenizer, TokenizerError

DEFAULT_NEW_TOKENS = 50


class GenerationError(ValueError):
    """A request that cannot be served as asked (prompt too long, bad lengths, empty prompt)."""


@dataclass
class Request:
    """Validated lengths for one call."""

    prompts: list[list[int]]
    max_new_tokens: int


class CPMGenerator:
    def __init__(self, decoder, tokenizer: CPMTokenizer, config: dict):
        self.decoder, self.tokenizer, self.config = decoder, tokenizer, config
        self.graph_name: str | None = None  # the manifest graph it runs, when loaded from a bundle
        self.n_positions = config["n_positions"]
        self.eod_id = config.get("eod_id", tokenizer.eod_id)
        # a model vocabulary padded past the tokenizer's must never yield ids that cannot be decoded
        self.decodable = min(config["vocab_size"], tokenizer.vocab_size)

    @classmethod
    def from_bundle(cls, path: str | Path, provider: str = "cpu", threads: int | None = None,
                    verify: bool = True, variant: str | None = None, backend: str = "onnxruntime") -> "CPMGenerator":
        """Load a bundle; ``variant`` names a graph of the manifest (default: the bundle's default).

        ``backend="tensorrt"`` runs the bundle's TensorRT engine built for this GPU instead.
        """
        bundle = Bundle.open(path, verify=False)  # schema, paths and sizes; checksums below, for what runs
        if bundle.tokenizer_path is None:
            raise ValueError(f"bundle {path} ships no tokenizer model")
        if backend == "tensorrt":
            decoder, name = _tensorrt_decoder(bundle, verify)
        elif backend == "onnxruntime":
            name = variant or bundle.default_graph
            graph = bundle.graph(name)
            files = bundle.graph_files(name)  # where its weights come from is checked even unverified
            if verify:
                bundle.verify(files)
            prefill = graph.get("prefill")
            decoder = open_decoder(bundle.resolve(graph["file"]), bundle.config, graph.get("kv_cache", "concat"),
                                   provider, threads, prefill_path=bundle.resolve(prefill["file"]) if prefill else None)
        else:
            raise ValueError(f"unknown backend {backend!r}; choose onnxruntime or tensorrt")
        gen = cls(decoder, CPMTokenizer(bundle.tokenizer_path), bundle.config)
        gen.graph_name = name
        return gen

    # -- the pipeline-style call ------------------------------------------------------------------
    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None,
                 max_new_tokens: int | None = None, num_return_sequences: int = 1,
                 truncate_prompt: bool = False, **sampling) -> list:
        """Like transformers' TextGenerationPipeline: [{'generated_text': prompt + continuation}].

        A list of prompts gives a list of such lists. Sampling keywords: do_sample, temperature,
        top_k, top_p, repetition_penalty, presence_penalty, frequency_penalty, logit_bias
        ({token id: bias}), seed, stop.
        """
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        ids = self.generate_ids(texts, max_length=max_length, max_new_tokens=max_new_tokens,
                                num_return_sequences=num_return_sequences, truncate_prompt=truncate_prompt, **sampling)
        stop = tuple(sampling.get("stop") or ())
        out = [[{"generated_text": text + self._finish(ids[i * num_return_sequences + j], stop)}
                for j in range(num_return_sequences)] for i, text in enumerate(texts)]
        return out[0] if single else out

    def _finish(self, ids: list[int], stop: tuple[str, ...]) -> str:
        text = self.tokenizer.decode([t for t in ids if t != self.eod_id])
        return cut_at_stop(text, stop)[0]

    # -- token level ------------------------------------------------------------------------------
    def prepare(self, texts: Sequence[str], max_length: int | None, max_new_tokens: int | None,
                truncate_prompt: bool) -> Request:
        if not texts:
            raise GenerationError("no prompt given")
        prompts = []
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise GenerationError("empty prompt")
            try:
                prompts.append(self.tokenizer.encode(t))
            except TokenizerError as e:
                raise GenerationError(str(e)) from None
        return self.check_lengths(prompts, max_length, max_new_tokens, truncate_prompt)

    def check_lengths(self, prompts: list[list[int]], max_length: int | None, max_new_tokens: int | None,
                      truncate_prompt: bool = False) -> Request:
        if max_length is not None and max_new_tokens is not None:
            raise GenerationError("give max_length or max_new_tokens, not both")
        if max_length is not None and max_length > self.n_positions:
            raise GenerationError(f"max_length {max_length} exceeds the model's {self.n_positions} positions")
        longest = max(len(p) for p in prompts)
        if not all(prompts):
            raise GenerationError("a prompt encodes to no tokens")
        if max_length is not None:
            new = max_length - longest
            if new < 1:
                raise GenerationError(f"max_length {max_length} leaves no room after a {longest}-token prompt "
                                      "(max_length counts the prompt)")
        else:
            new = DEFAULT_NEW_TOKENS if max_new_tokens is None else max_new_tokens
            if new < 1:
                raise GenerationError(f"max_new_tokens must be >= 1, got {new}")
        if longest + new > self.n_positions:
            if not truncate_prompt:
                raise GenerationError(
                    f"prompt of {longest} tokens + {new} new tokens exceeds the model's {self.n_positions} positions; "
                    "shorten the prompt or allow left truncation (truncate_prompt=True, --truncate-prompt)")
            if new >= self.n_positions:
                raise GenerationError(f"{new} new tokens exceed the model's {self.n_positions} positions")
            keep = self.n_positions - new
            prompts = [p[-keep:] for p in prompts]
        return Request(prompts, new)

    def check_sampling(self, cfg: SamplingConfig) -> None:
        """What SamplingConfig cannot check alone: token ids against this model's vocabulary."""
        if any(t >= self.decodable for t, _ in cfg.logit_bias):
            raise GenerationError(f"logit_bias token ids must be in 0..{self.decodable - 1}")

    def generate_ids(self, texts: Sequence[str], max_length: int | None = None, max_new_tokens: int | None = None,
                     num_return_sequences: int = 1, truncate_prompt: bool = False, **sampling) -> list[list[int]]:
        """New token ids per sequence (prompt-major: prompt i's sequences are i*n .. i*n+n-1)."""
        req = self.prepare(texts, max_length, max_new_tokens, truncate_prompt)
        out = None
        for out in self.iter_ids(req.prompts, req.max_new_tokens, num_return_sequences, SamplingConfig(**sampling_keywords(sampling))):
            pass
        return out

    def iter_ids(self, prompts: list[list[int]], max_new_tokens: int, num_return_sequences: int,
                 cfg: SamplingConfig) -> Iterator[list[list[int]]]:
        """Yield the new ids of every sequence after each step (finished rows stop growing)."""
        check_choices(num_return_sequences, cfg.do_sample)
        rows = [p for p in prompts for _ in range(num_return_sequences)]
        B = len(rows)
        rng = np.random.default_rng(cfg.seed)
        self.check_sampling(cfg)
        seen = _seen_from(rows, self.config["vocab_size"]) if cfg.repetition_penalty != 1.0 else None
        counts = np.zeros((B, self.config["vocab_size"]), np.int32) if cfg.counts_tokens else None
        generated: list[list[int]] = [[] for _ in range(B)]
        done = np.zeros(B, bool)
        texts = [TextStream(self.tokenizer, cfg.stop) for _ in range(B)] if cfg.stop else None
        capacity = max(len(r) for r in rows) + max_new_tokens
        logits, state = self.decoder.prefill(rows, capacity, self.tokenizer.pad_id)
        for step in range(max_new_tokens):
            if self.decodable < logits.shape[-1]:
                logits[:, self.decodable:] = -np.inf
            tok = next_tokens(logits, cfg, rng, seen, counts)
            tok[done] = self.eod_id
            for r in np.flatnonzero(~done):
                generated[r].append(int(tok[r]))
                if tok[r] == self.eod_id:
                    done[r] = True
                elif texts is not None:
                    texts[r].push(int(tok[r]))
                    done[r] = texts[r].stopped
            if seen is not None:
                seen[np.arange(B), tok] = True
            if counts is not None:
                counts[np.arange(B), tok] += 1
            yield generated
            if done.all() or step == max_new_tokens - 1:
                return
            logits = self.decoder.step(state, tok)

    def stream(self, prompt: str, max_length: int | None = None, max_new_tokens: int | None = None,
               truncate_prompt: bool = False, **sampling) -> Iterator[str]:
        """Text pieces of one continuation as they are decoded (whole characters only)."""
        req = self.prepare([prompt], max_length, max_new_tokens, truncate_prompt)
        cfg = SamplingConfig(**sampling_keywords(sampling))
        text = TextStream(self.tokenizer, cfg.stop)
        for out in self.iter_ids(req.prompts, req.max_new_tokens, 1, cfg):
            tok = out[0][-1]
            if tok != self.eod_id and (piece := text.push(tok)):
                yield piece
        if rest := text.finish():
            yield rest


def _tensorrt_decoder(bundle: Bundle, verify: bool):
    from ..backends.cuda import device
    from ..backends.tensorrt_decoder import TensorRTDecoder

    engines = bundle.manifest.get("engines", {})
    if not engines:
        raise ValueError(f"bundle {bundle.path} has no TensorRT engine; build one on this GPU with `cpm-trt build`")
    cc = list(device()["compute_capability"])
    name = next((k for k, e in engines.items() if list(e["compute_capability"]) == cc), next(iter(engines)))
    file = engines[name]["file"]
    if verify:
        bundle.verify([file, bundle.manifest["tokenizer"]["file"]])
    return TensorRTDecoder(bundle.resolve(file), engines[name], bundle.config), name


def check_choices(num_return_sequences, do_sample: bool) -> None:
    """Sequences per prompt: at least one, and more only when sampling (greedy would repeat one)."""
    if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        raise GenerationError(f"num_return_sequences must be a whole number >= 1, got {num_return_sequences!r}")
    if not do_sample and num_return_sequences > 1:
        raise GenerationError("num_return_sequences > 1 needs do_sample (greedy would repeat one sequence)")


def sampling_keywords(sampling: dict) -> dict:
    """The keywords SamplingConfig (frozen, hashable) takes: stop and logit_bias as tuples."""
    if "stop" in sampling:
        stop = sampling["stop"]
        sampling = dict(sampling, stop=(stop,) if isinstance(stop, str) else tuple(stop or ()))
    if isinstance(sampling.get("logit_bias"), dict):
        sampling = dict(sampling, logit_bias=tuple(sorted(sampling["logit_bias"].items())))
    return sampling


def _seen_from(rows: list[list[int]], vocab: int) -> np.ndarray:
    seen = np.zeros((len(rows), vocab), bool)
    for r, ids in enumerate(rows):
        seen[r, ids] = True
    return seen
