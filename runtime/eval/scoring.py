"""Teacher-forced log-probabilities of known token sequences, on any graph of a bundle. No torch.

One call: ``scorer.logprobs(prefixes, continuations)`` -> per row, log p(token | everything before it)
for each continuation token; ``scorer.positions(rows, top)`` scores every token of each row after its
first, with the ``top`` most likely tokens at each position (an echoed prompt's logprobs over the
API). Three ways to get them, best first:

- ``OnePassScorer``: the graph's scoring twin (optimize/score_graph.py) runs prefix + continuation in
  one forward pass and returns each position's log-probability of the next token.
- ``FullLogitsScorer``: the standard graph with logits at every position (``decoder.onnx``).
- ``StepScorer``: any decoder's prefill, then one decode step per continuation token (TensorRT
  engines, graphs without a scoring twin).

Rows are sorted by length and sent in groups of at most ``max_rows`` rows and ``TOKENS_PER_PASS``
padded positions (a longer row goes alone): the head's [positions, vocabulary] logits are the largest
tensor of a pass, and passes whose activations stay in the cores' caches run fastest
(docs/design.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle.reader import Bundle, BundleError
from ..backends.ort_decoder import kv_buffers, prompt_feeds
from ..backends.padding import right_pad
from ..backends.session import create_session, np_type
from ..text.tokenizer import CPMTokenizer
from .metrics import continuation_logprobs

# a scoring twin's interface (optimize/score_graph.py writes it)
TARGETS_INPUT, SCORE_OUTPUT = "target_ids", "token_logprobs"
TOP_OUTPUTS = ("top_logprobs", "top_ids")
MAX_TOP = 5  # alternatives per position the twins give (OpenAI's limit too)

TOKENS_PER_PASS = 256
METHODS = ("auto", "one-pass", "steps")
log = logging.getLogger("cpm_deploy")


class ScoringError(BundleError):
    """This scorer cannot give what was asked (top alternatives from an older scoring graph)."""


@dataclass(frozen=True)
class Positions:
    """A row's tokens after its first: each one's log-probability given those before it [n-1], and
    at each position the ``top`` most likely tokens' ids and log-probabilities [n-1, top], best
    first; the last row of the top arrays is the position after the row (its next token) [n, top]."""

    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


class Scorer:
    """What every scorer knows besides ``logprobs``: its graph, tokenizer and limits."""

    method = ""

    def __init__(self, tokenizer: CPMTokenizer, config: dict, graph_name: str, max_rows: int):
        self.tokenizer, self.config, self.graph_name, self.max_rows = tokenizer, config, graph_name, max_rows
        self.n_positions = config["n_positions"]

    def logprobs(self, prefixes: list[list[int]], continuations: list[list[int]]) -> list[np.ndarray]:
        if any(not p for p in prefixes) or any(not c for c in continuations):
            raise ValueError("every row needs a prefix token and a continuation token")
        if (need := max(len(p) + len(c) for p, c in zip(prefixes, continuations)) - 1) > self.n_positions:
            raise ValueError(f"a row needs {need} positions; the model has {self.n_positions}")
        out: list[np.ndarray] = [np.empty(0)] * len(prefixes)
        for group in self._groups([len(p) + len(c) for p, c in zip(prefixes, continuations)]):
            for i, lp in zip(group, self._score([prefixes[i] for i in group], [continuations[i] for i in group])):
                out[i] = lp
        return out

    def positions(self, rows: list[list[int]], top: int = 0) -> list[Positions]:
        """Every row's tokens scored after its first, with the ``top`` (at most MAX_TOP) most likely
        tokens at each position and at the one after the row (the next token's)."""
        if not 0 <= top <= MAX_TOP:
            raise ValueError(f"top must be 0 to {MAX_TOP}")
        if any(not r for r in rows):
            raise ValueError("every row needs a token")
        if (need := max(len(r) for r in rows)) > self.n_positions:
            raise ValueError(f"a row needs {need} positions; the model has {self.n_positions}")
        out: list[Positions | None] = [None] * len(rows)
        for group in self._groups([len(r) for r in rows]):
            for i, got in zip(group, self._positions([rows[i] for i in group], top)):
                out[i] = got
        return out

    def _positions(self, rows: list[list[int]], top: int) -> list[Positions]:
        raise ScoringError(f"{self.graph_name} scores {self.method}, which gives no prompt log-probabilities "
                           "with alternatives: re-export the bundle for its scoring graph")

    def _groups(self, lengths: list[int]) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        groups, current = [], []
        for i in order:  # ascending: the last row added sets the group's width
            if current and (len(current) == self.max_rows or (len(current) + 1) * lengths[i] > TOKENS_PER_PASS):
                groups.append(current)
                current = []
            current.append(i)
        return groups + [current] if current else groups

    def _score(self, prefixes: list[list[int]], continuations: list[list[int]]) -> list[np.ndarray]:
        raise NotImplementedError


class OnePassScorer(Scorer):
    method = "one pass"

    def __init__(self, path: Path, *args, provider: str = "cpu", threads: int | None = None):
        super().__init__(*args)
        self.session = create_session(path, provider, threads)
        names = {v.name for v in (*self.session.get_inputs(), *self.session.get_outputs())}
        if not {TARGETS_INPUT, SCORE_OUTPUT, "input_ids", "seqlens_k"} <= names:
            raise BundleError(f"{Path(path).name} is not a scoring graph (no target_ids -> token_logprobs)")
        cfg = self.config
        self.kv_shape = [cfg["n_head"], cfg["n_embd"] // cfg["n_head"]]
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        kv_type = next(i.type for i in self.session.get_inputs() if i.name == self.past_names[0])
        self.kv_dtype = np_type(kv_type)
        self.device = "cuda" if provider in ("cuda", "tensorrt") else "cpu"
        self.has_top = set(TOP_OUTPUTS) <= names  # twins exported before the API's logprobs lack them
        self._kv: tuple[tuple, list] = ((), [])  # the last pass's buffers, reused while its shape repeats

    def _buffers(self, batch: int, width: int) -> list:
        shape = (batch, self.kv_shape[0], width, self.kv_shape[1])
        if self._kv[0] != shape:
            self._kv = (shape, [])  # drop the old set before allocating the new one
            self._kv = (shape, kv_buffers(len(self.past_names), list(shape), self.kv_dtype, self.device))
        return self._kv[1]

    def _run(self, rows: list[list[int]], top: bool, targets: list[list[int]] | None = None) -> list[np.ndarray]:
        """token_logprobs [B, S] of ``targets`` (default: each row's next tokens, the row's last
        token left out of the input), and with ``top``, top_logprobs and top_ids [B, S, MAX_TOP]."""
        if targets is None:
            rows, targets = [r[:-1] for r in rows], [r[1:] for r in rows]
        feeds = prompt_feeds(rows, self.tokenizer.pad_id)
        feeds[TARGETS_INPUT] = right_pad(targets, 0)[0]
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in (SCORE_OUTPUT, *(TOP_OUTPUTS if top else ())):
            binding.bind_output(name, "cpu")
        for name, value in zip(self.past_names, self._buffers(len(rows), feeds["input_ids"].shape[1])):
            binding.bind_ortvalue_input(name, value)  # an empty cache, written in place and never read
            binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
        self.session.run_with_iobinding(binding)
        return [v.numpy() for v in binding.get_outputs()[:3 if top else 1]]

    def _score(self, prefixes, continuations):
        rows = [p + c for p, c in zip(prefixes, continuations)]
        lp = self._run(rows, top=False)[0]
        return [lp[b, len(p) - 1:len(r) - 1].astype(np.float64) for b, (p, r) in enumerate(zip(prefixes, rows))]

    def _positions(self, rows, top):
        if not self.has_top:
            return super()._positions(rows, top)
        # whole rows in, each next token as the target (a pad after the last: its alternatives are
        # the distribution of the token that would follow the row)
        lp, top_lp, top_ids = self._run(rows, True, [r[1:] + [0] for r in rows])
        return [Positions(lp[b, :len(r) - 1].astype(np.float64), top_ids[b, :len(r), :top].astype(np.int64),
                          top_lp[b, :len(r), :top].astype(np.float64)) for b, r in enumerate(rows)]


class FullLogitsScorer(Scorer):
    method = "one pass"

    def __init__(self, path: Path, *args, provider: str = "cpu", threads: int | None = None):
        super().__init__(*args)
        self.session = create_session(path, provider, threads)
        cfg = self.config
        self.kv_shape = [cfg["n_head"], 0, cfg["n_embd"] // cfg["n_head"]]  # an empty past per row
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]

    def _logits(self, rows: list[list[int]]) -> np.ndarray:
        """Logits [B, S, V] at every position of the right-padded rows, from an empty past."""
        ids, pos, lengths = right_pad(rows, self.tokenizer.pad_id)
        mask = (np.arange(ids.shape[1]) < lengths[:, None]).astype(np.int64)
        past = np.zeros((len(rows), *self.kv_shape), np.float32)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos} | dict.fromkeys(self.past_names, past)
        return self.session.run(["logits"], feeds)[0]

    def _score(self, prefixes, continuations):
        rows = [p + c for p, c in zip(prefixes, continuations)]
        logits = self._logits([r[:-1] for r in rows])
        targets = right_pad([r[1:] for r in rows], 0)[0]
        return [_picked_logprobs(logits[b, len(p) - 1:len(r) - 1], targets[b, len(p) - 1:len(r) - 1])
                for b, (p, r) in enumerate(zip(prefixes, rows))]

    def _positions(self, rows, top):
        from ..generation.logprobs import logprobs_of

        logits = self._logits(rows)
        out = []
        for b, r in enumerate(rows):
            got = logprobs_of(logits[b, :len(r)], np.array(r[1:] + [0]), top)
            out.append(Positions(np.array([g.logprob for g in got[:-1]]),
                                 np.array([[i for i, _ in g.top] for g in got], np.int64).reshape(len(got), top),
                                 np.array([[lp for _, lp in g.top] for g in got]).reshape(len(got), top)))
        return out


def _picked_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log_softmax(logits)[t, targets[t]]: exp in float32, sums in float64."""
    logits = logits.astype(np.float32, copy=False)
    top = logits.max(-1, keepdims=True)
    norm = np.log(np.exp(logits - top).sum(-1, dtype=np.float64))
    return (logits[np.arange(len(targets)), targets] - top[:, 0]).astype(np.float64) - norm


class StepScorer(Scorer):
    method = "step by step"

    def __init__(self, decoder, *args):
        super().__init__(*args)
        self.decoder = decoder

    def _groups(self, lengths):  # a decode step costs the same at any width: keep the caller's order
        return [list(range(s, min(s + self.max_rows, len(lengths)))) for s in range(0, len(lengths), self.max_rows)]

    def _score(self, prefixes, continuations):
        # cpu-int4 scores on its own 4-bit steps at any width, not on its int8 prompt graph
        with self.decoder.own_graph_steps():
            return continuation_logprobs(self.decoder, prefixes, continuations, self.tokenizer.pad_id)


def open_scorer(path: str | Path, graph: str | None = None, method: str = "auto", batch: int = 32,
                provider: str = "cpu", threads: int | None = None, backend: str = "onnxruntime",
                verify: bool = True) -> Scorer:
    """The fastest scorer ``method`` allows for ``graph`` of the bundle at ``path`` (default: the
    bundle's default graph). ``batch``: rows per pass at most."""
    if method not in METHODS:
        raise ValueError(f"unknown scoring method {method!r}; choose {', '.join(METHODS)}")
    bundle = Bundle.open(path, verify=False)
    if bundle.tokenizer_path is None:
        raise BundleError(f"bundle {path} ships no tokenizer model")
    name = graph or bundle.default_graph
    if backend == "onnxruntime" and method != "steps":
        entry, graphs = bundle.graph(name), bundle.manifest["graphs"]
        full = name if entry.get("logits") == "all" else ("decoder" if name == "decoder_last" and "decoder" in graphs
                                                           else None)
        args = (CPMTokenizer(bundle.tokenizer_path), bundle.config, name, batch)
        if entry.get("score"):
            files = bundle.graph_files(name, part="score")
            if verify:
                bundle.verify(files)
            return OnePassScorer(bundle.resolve(entry["score"]["file"]), *args, provider=provider, threads=threads)
        if full is not None:
            files = bundle.graph_files(full)
            if verify:
                bundle.verify(files)
            return FullLogitsScorer(bundle.resolve(graphs[full]["file"]), *args, provider=provider, threads=threads)
        if method == "one-pass":
            raise BundleError(f"graph {name} has no scoring graph (bundles exported before cpm-deploy 0.2 lack "
                              "them): re-export the bundle, or score step by step")
        log.warning("graph %s has no scoring graph (an older export): scoring one decode step per token, "
                    "many times slower; re-export the bundle for one-pass scoring", name)
    from ..generation.generator import CPMGenerator  # a decoder of any backend, opened as generation opens it

    gen = CPMGenerator.from_bundle(path, provider, threads, verify, graph, backend)
    rows = min(batch, gen.decoder.max_batch or batch)  # a TensorRT engine's batch profile
    return StepScorer(gen.decoder, gen.tokenizer, gen.config, gen.graph_name, rows)
