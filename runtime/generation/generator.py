"""CPMGenerator: text in, text out, on a cpm-export bundle with onnxruntime. No torch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backends import open_decoder
from ..bundle.reader import Bundle
from ..text.text_stream import cut_at_stop
from ..text.tokenizer import CPMTokenizer, TokenizerError
from .requests import GenerationError, check_bias, check_choices, check_prompt_ids, fit_prompts, new_tokens, sampling_config
from .sampling import SamplingConfig
from .step import SequenceDecoding, choose_next


@dataclass
class Request:
    """Validated lengths for one call."""

    prompts: list[list[int]]
    max_new_tokens: int


class CPMGenerator:
    def __init__(self, decoder, tokenizer: CPMTokenizer, config: dict):
        self.decoder, self.tokenizer, self.config = decoder, tokenizer, config
        self.graph_name: str | None = None  # the manifest graph it runs, when loaded from a bundle
        self.source: dict | None = None  # how it was loaded from a bundle (path, provider, threads, verify)
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
        gen.source = {"path": Path(path), "provider": provider, "threads": threads, "verify": verify}
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
        stop = self.sampling(**sampling).stop  # a string is one stop string, not its characters
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
        for p in prompts:
            check_prompt_ids(p, self.decodable)
        new = new_tokens(max_length, max_new_tokens, max(len(p) for p in prompts), self.n_positions)
        return Request(fit_prompts(prompts, new, self.n_positions, truncate_prompt), new)

    def sampling(self, **sampling) -> SamplingConfig:
        """A SamplingConfig checked against this model's vocabulary (raises GenerationError)."""
        return sampling_config(sampling, self.decodable)

    def generate_ids(self, texts: Sequence[str], max_length: int | None = None, max_new_tokens: int | None = None,
                     num_return_sequences: int = 1, truncate_prompt: bool = False, **sampling) -> list[list[int]]:
        """New token ids per sequence (prompt-major: prompt i's sequences are i*n .. i*n+n-1)."""
        req = self.prepare(texts, max_length, max_new_tokens, truncate_prompt)
        out = None
        for out in self.iter_ids(req.prompts, req.max_new_tokens, num_return_sequences, self.sampling(**sampling)):
            pass
        return out

    def iter_ids(self, prompts: list[list[int]], max_new_tokens: int, num_return_sequences: int,
                 cfg: SamplingConfig) -> Iterator[list[list[int]]]:
        """Yield the new ids of every sequence after each step (finished rows stop growing)."""
        check_choices(num_return_sequences, cfg.do_sample)
        rows = [p for p in prompts for _ in range(num_return_sequences)]
        seqs = self.sequences(rows, max_new_tokens, cfg, num_return_sequences, track_text=False)
        for _ in self.decode(rows, seqs):
            yield [s.generated for s in seqs]

    def sequences(self, rows: list[list[int]], max_new_tokens: int, cfg: SamplingConfig, choices: int = 1,
                  track_text: bool = True) -> list[SequenceDecoding]:
        """One SequenceDecoding per row; rows come ``choices`` per prompt (row i is choice i % choices)."""
        check_bias(cfg, self.decodable)
        return [SequenceDecoding(r, cfg, max_new_tokens, self.tokenizer, self.config["vocab_size"], self.eod_id,
                                 i % choices, track_text) for i, r in enumerate(rows)]

    def decode(self, rows: list[list[int]], seqs: list[SequenceDecoding]) -> Iterator[list[str]]:
        """Run the sequences to their end; after each step, yield the text each row showed in it."""
        capacity = max(len(r) for r in rows) + max(s.max_new_tokens for s in seqs)
        logits, state = self.decoder.prefill(rows, capacity, self.tokenizer.pad_id)
        tokens = np.full(len(seqs), self.eod_id, np.int64)  # finished rows feed <eod>, never read
        while True:
            active = [i for i, s in enumerate(seqs) if not s.done]
            live = [seqs[i] for i in active]
            tokens[active] = choose_next(logits if len(active) == len(seqs) else logits[active], live, self.decodable)
            pieces = [""] * len(seqs)
            for i, s in zip(active, live):
                pieces[i] = s.accept(int(tokens[i]))
            yield pieces
            if all(s.done for s in seqs):
                return
            logits = self.decoder.step(state, tokens)

    def stream(self, prompt: str, max_length: int | None = None, max_new_tokens: int | None = None,
               truncate_prompt: bool = False, **sampling) -> Iterator[str]:
        """Text pieces of one continuation as they are decoded (whole characters only)."""
        req = self.prepare([prompt], max_length, max_new_tokens, truncate_prompt)
        seqs = self.sequences(req.prompts, req.max_new_tokens, self.sampling(**sampling))
        for pieces in self.decode(req.prompts, seqs):
            if pieces[0]:
                yield pieces[0]
        if rest := seqs[0].rest():
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
