"""Decoder sessions on onnxruntime with IOBinding: ``prefill(rows, capacity)`` then ``step(state, tokens)``.

Two graph kinds:
- ``ConcatKVDecoder``: the exporter's standard graph (attention_mask, past grows by Concat).
  Prompts are left-padded; presents stay OrtValues bound as the next past (never through numpy).
- ``SharedKVDecoder``: the fused GroupQueryAttention graph. One KV buffer per layer is allocated
  at the needed capacity and written in place; prompts are right-padded with per-row lengths.
  A graph may name a second graph for prompts (cpu-int4 runs them on the int8 graph); both
  sessions read and write the same KV buffers, and decode steps of many rows run there too.
Only the last valid position's logits are copied out.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..system import huge_pages
from .kv_pool import KVPool
from .padding import left_pad
from .session import create_session, np_type

# Prompts longer than this run in chunks, each attending to what the earlier ones cached:
# GroupQueryAttention computes the whole masked square of a prompt, so chunks skip half of the
# upper triangle; smaller chunks lose more to per-call work than they save (docs/design.md).
PREFILL_CHUNK = 256
# With a prompt graph beside it (cpu-int4's int8 graph), decode steps of this many rows or more run
# on that graph: 4-bit MatMulNBits loses to the int8 GEMM from 3 rows up (docs/design.md).
STEPS_ON_PROMPT_GRAPH_FROM = 3


class _OrtDecoder:
    max_batch = None  # any number of rows

    def __init__(self, path: str | Path, config: dict, provider: str = "cpu", threads: int | None = None,
                 prefill_path: str | Path | None = None):
        import onnxruntime as ort

        self.ort = ort
        # two sessions take turns on the same cores: neither may keep its threads spinning once its
        # run is done (cpu-int4: prompts faster, decode steps unchanged)
        alone = prefill_path is None
        before = huge_pages.snapshot() if provider == "cpu" else None
        self.session = create_session(path, provider, threads, spin_after_run=alone)
        self.prefill_session = self.session if alone else create_session(prefill_path, provider, threads,
                                                                          spin_after_run=False)
        if not alone and _io(self.prefill_session) != _io(self.session):
            raise ValueError(f"the prompt graph {Path(prefill_path).name} does not take and give what "
                             f"{Path(path).name} does: they cannot share KV buffers")
        self.huge_pages = huge_pages.collapse_since(before)  # the weights onto 2 MiB pages, in the background
        self.steps_on_prompt_graph_from = None if alone else STEPS_ON_PROMPT_GRAPH_FROM
        self.n_layer, self.n_head = config["n_layer"], config["n_head"]
        self.head_dim = config["n_embd"] // config["n_head"]
        self.device = "cuda" if provider in ("cuda", "tensorrt") else "cpu"
        self.past_names = [f"past_key_values.{i}.{k}" for i in range(self.n_layer) for k in ("key", "value")]
        types = {i.name: i.type for i in self.session.get_inputs()}
        self.dtype = np_type(types[self.past_names[0]])  # the KV cache's: float32, float16 or int8
        self.present_names = [f"present.{i}.{k}" for i in range(self.n_layer) for k in ("key", "value")]

    def settle(self) -> None:
        if self.huge_pages is not None:
            self.huge_pages.join()

    def step_session(self, batch: int):
        """The session a decode step of ``batch`` rows runs on."""
        wide = self.steps_on_prompt_graph_from is not None and batch >= self.steps_on_prompt_graph_from
        return self.prefill_session if wide else self.session

    @contextmanager
    def own_graph_steps(self):
        """Every decode step on this decoder's own graph, whatever its width: for measuring that
        graph (cpm-eval scores many rows per call, and asks about cpu-int4, not its int8 graph)."""
        saved, self.steps_on_prompt_graph_from = self.steps_on_prompt_graph_from, None
        try:
            yield self
        finally:
            self.steps_on_prompt_graph_from = saved

    def _kv(self, batch: int, length: int) -> list:
        return kv_buffers(len(self.past_names), [batch, self.n_head, length, self.head_dim], self.dtype, self.device)

    def _run(self, feeds: dict[str, np.ndarray], past: list, shared: bool, session=None) -> tuple[np.ndarray, list]:
        session = session or self.session
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in zip(self.past_names, past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name, value in zip(self.present_names, past):
            if shared:
                binding.bind_ortvalue_output(name, value)  # the same buffer: written in place
            else:
                binding.bind_output(name, self.device)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy()[:, -1, :].astype(np.float32), (past if shared else outputs[1:])


def kv_buffers(count: int, shape: list[int], dtype, device: str) -> list:
    """One buffer per layer and kind, owned by onnxruntime on the device.

    Never one numpy array wrapped many times: on the CPU an OrtValue shares the array's memory, and
    shared-KV graphs write these buffers in place.
    """
    import onnxruntime as ort

    return [ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device) for _ in range(count)]


def _io(session) -> tuple:
    return tuple((v.name, v.type) for v in session.get_inputs()), tuple((v.name, v.type) for v in session.get_outputs())


@dataclass
class ConcatState:
    mask: np.ndarray  # [B, T]
    position: np.ndarray  # [B, 1] of the last token
    past: list = field(repr=False)


class ConcatKVDecoder(_OrtDecoder):
    kind = "concat"

    def __init__(self, *args, prefill_path=None, **kwargs):
        if prefill_path:
            raise ValueError("a prefill graph needs shared KV buffers; this graph concatenates its past")
        super().__init__(*args, **kwargs)

    def prefill(self, rows: list[list[int]], capacity: int, pad_id: int = 0) -> tuple[np.ndarray, ConcatState]:
        ids, mask, pos = left_pad(rows, pad_id)
        logits, past = self._run({"input_ids": ids, "attention_mask": mask, "position_ids": pos},
                                 self._kv(len(rows), 0), shared=False)
        return logits, ConcatState(mask, pos[:, -1:], past)

    def step(self, state: ConcatState, tokens: np.ndarray) -> np.ndarray:
        state.mask = np.concatenate([state.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
        state.position = state.position + 1
        logits, state.past = self._run({"input_ids": tokens.reshape(-1, 1).astype(np.int64),
                                        "attention_mask": state.mask, "position_ids": state.position},
                                       state.past, shared=False)
        return logits


def _lengths(lengths: np.ndarray, query: np.ndarray) -> dict[str, np.ndarray]:
    """GroupQueryAttention's length inputs: ``lengths`` tokens per row once the call is done, of
    which ``query`` are new in it."""
    return {"seqlens_k": (lengths - 1).astype(np.int32), "total_sequence_length": np.array(lengths.max(), np.int32),
            "query_seqlens": query.astype(np.int32)}


def prompt_feeds(rows: list[list[int]], pad_id: int = 0) -> dict[str, np.ndarray]:
    """Whole prompts into empty cache rows, right-padded, in one call (scoring graphs take these)."""
    return continuation_feeds(rows, np.zeros(len(rows), np.int64), 0, max(len(r) for r in rows), pad_id)[0]


def continuation_feeds(rows: list[list[int]], cached: np.ndarray, start: int, width: int,
                       pad_id: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Columns start .. start+width of each row's new tokens, after ``cached`` [B] positions and the
    columns before ``start``, right-padded (GroupQueryAttention's ``query_seqlens`` places each row
    at its own position; a row with nothing left is an idle entry). Also which rows end here."""
    lengths = np.array([len(r) for r in rows], np.int64)
    query = np.clip(lengths - start, 0, width)
    ids = np.full((len(rows), max(int(query.max()), 1)), pad_id, np.int64)
    pos = np.zeros_like(ids)
    for b, (row, q) in enumerate(zip(rows, query)):
        ids[b, :q] = row[start:start + q]
        pos[b, :q] = np.arange(cached[b] + start, cached[b] + start + q)
    totals = cached + np.minimum(lengths, start + query)
    return ({"input_ids": ids, "position_ids": pos, **_lengths(totals, query)},
            (query > 0) & (start + query == lengths))


@dataclass
class SharedState:
    lengths: np.ndarray  # [B] tokens in the cache
    capacity: int
    past: list = field(repr=False)
    steps: StepBinding | None = field(default=None, repr=False)  # made at the first step


class StepBinding:
    """Decode steps over one set of KV buffers through one IOBinding, bound once.

    Each step rewrites the small input arrays in place (on the CPU a bound OrtValue shares its
    array's memory) and onnxruntime writes logits into a bound array. Rebinding every KV buffer,
    five inputs and a fresh logits output each step is a visible share of a small model's step.
    The owner keeps it as long as the buffers: it holds them. ``logits`` lends it the
    output array (rows of one shared buffer, say: a server binds every batch width it runs).
    """

    def __init__(self, decoder: SharedKVDecoder, past: list, logits: np.ndarray | None = None):
        batch = past[0].shape()[0]
        ort, session = decoder.ort, decoder.step_session(batch)
        self.session, self.past = session, past
        self.binding = session.io_binding()
        self.inputs = {"input_ids": np.zeros((batch, 1), np.int64), "position_ids": np.zeros((batch, 1), np.int64),
                       "seqlens_k": np.zeros(batch, np.int32), "total_sequence_length": np.zeros((), np.int32),
                       "query_seqlens": np.ones(batch, np.int32)}  # one new token per row, every step
        self._values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.inputs.values()]  # keep them alive
        for name, value in zip(self.inputs, self._values):
            self.binding.bind_ortvalue_input(name, value)
        for name, value in zip(decoder.past_names, past):
            self.binding.bind_ortvalue_input(name, value)
        for name, value in zip(decoder.present_names, past):
            self.binding.bind_ortvalue_output(name, value)
        self.logits = decoder.logits_buffer(batch) if logits is None else logits
        if self.logits is None:  # a symbolic vocabulary size: onnxruntime allocates the output
            self.binding.bind_output("logits", "cpu")
        else:
            self._values.append(ort.OrtValue.ortvalue_from_numpy(self.logits))
            self.binding.bind_ortvalue_output("logits", self._values[-1])

    def run(self, tokens: np.ndarray, cached: np.ndarray, idle: np.ndarray | None = None) -> np.ndarray:
        """One token per row after ``cached`` [B] tokens; logits [B, V] (a copy: the next step
        writes the bound array again). ``idle`` [B] bool: rows that take no token this step (a
        prompt still being prefilled in chunks; at least one position cached): their cache stays
        as it is and their logits are meaningless."""
        x = self.inputs  # the same values as SharedKVDecoder._step_feeds, written in place
        x["input_ids"][:, 0] = tokens
        x["position_ids"][:, 0] = cached
        if idle is None:
            x["seqlens_k"][:] = cached  # (cached + 1) - 1
            x["query_seqlens"][:] = 1
        else:
            x["seqlens_k"][:] = cached - idle
            x["query_seqlens"][:] = ~idle
        x["total_sequence_length"][...] = cached.max() + 1
        self.session.run_with_iobinding(self.binding)
        logits = self.logits if self.logits is not None else self.binding.get_outputs()[0].numpy()
        return logits[:, -1, :].astype(np.float32)


class SharedKVDecoder(_OrtDecoder):
    kind = "shared"

    # -- batched entry points over caller-owned KV buffers (a server's slot pool) ------------------
    def run_prefill(self, rows: list[list[int]], past: list, pad_id: int = 0,
                    cached: np.ndarray | None = None) -> np.ndarray:
        """Prompt tokens into cache rows; ``past`` holds one [B, heads, capacity, head_dim] buffer
        per layer and kind. Row b's tokens go after ``cached[b]`` positions already in its row (a
        reused prefix, or earlier chunks of the same prompt; None: empty rows). Returns each row's
        last position's logits [B, V]."""
        lengths = np.array([len(r) for r in rows], np.int64)
        cached = np.zeros(len(rows), np.int64) if cached is None else np.asarray(cached, np.int64)
        out = None
        for start in range(0, int(lengths.max()), PREFILL_CHUNK):
            feeds, ends = continuation_feeds(rows, cached, start, PREFILL_CHUNK, pad_id)
            logits = self._run(feeds, past, shared=True, session=self.prefill_session)[0]
            if out is None:
                out = logits if ends.all() else np.empty_like(logits)
            if out is not logits:
                out[ends] = logits[ends]
        return out

    def _step_feeds(self, tokens: np.ndarray, cached: np.ndarray) -> dict[str, np.ndarray]:
        return {"input_ids": tokens.reshape(-1, 1).astype(np.int64), "position_ids": cached.reshape(-1, 1).astype(np.int64),
                **_lengths(cached + 1, np.ones_like(cached))}

    def run_step(self, tokens: np.ndarray, cached: np.ndarray, past: list) -> np.ndarray:
        """One token per row after ``cached`` [B] tokens already in that row's cache; logits [B, V].
        For many steps over the same buffers, ``step_binding(past).run`` binds them once."""
        session = self.step_session(len(tokens))
        return self._run(self._step_feeds(tokens, cached), past, shared=True, session=session)[0]

    def kv_pool(self, max_batch: int, capacity: int, store_blocks: int = 0, block_size: int = 16) -> KVPool:
        """KV slots for continuous batching: ``max_batch`` sequences of ``capacity`` positions, and a
        store of ``store_blocks`` blocks of ``block_size`` positions for prefixes prompts share."""
        return KVPool(len(self.past_names), max_batch, self.n_head, capacity, self.head_dim, self.dtype,
                      store_blocks, block_size)

    def step_binding(self, past: list, logits: np.ndarray | None = None) -> StepBinding:
        return StepBinding(self, past, logits)

    def logits_buffer(self, batch: int) -> np.ndarray | None:
        """An array steps can write their [batch, 1, V] logits into; None if V is not fixed."""
        out = self.session.get_outputs()[0]
        dtype = np.float16 if out.type == "tensor(float16)" else np.float32
        return np.empty((batch, 1, out.shape[-1]), dtype) if isinstance(out.shape[-1], int) else None

    def infer(self, feeds: dict[str, np.ndarray], past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One run on GroupQueryAttention's own feeds over numpy KV buffers (``past_key_values.*``),
        written in place and returned as ``present.*``, with logits [B, 1, V]: export verification
        checks any split of cached and new tokens through the binding that serves. A call with more
        than one new token per row runs where prompts run; one token, on this graph."""
        session = self.prefill_session if feeds["input_ids"].shape[1] > 1 else self.session
        buffers = [np.ascontiguousarray(past[name], self.dtype) for name in self.past_names]
        values = [self.ort.OrtValue.ortvalue_from_numpy(b) for b in buffers]  # share the arrays' memory
        logits = self._run(feeds, values, shared=True, session=session)[0]
        return {"logits": logits[:, None, :], **dict(zip(self.present_names, buffers))}

    # -- one generation call: buffers sized for it ------------------------------------------------
    def prefill(self, rows: list[list[int]], capacity: int, pad_id: int = 0) -> tuple[np.ndarray, SharedState]:
        lengths = np.array([len(r) for r in rows], np.int64)
        if lengths.max() > capacity:
            raise ValueError(f"prompt of {lengths.max()} tokens exceeds the KV capacity {capacity}")
        state = SharedState(lengths, capacity, self._kv(len(rows), capacity))
        return self.run_prefill(rows, state.past, pad_id), state

    def step(self, state: SharedState, tokens: np.ndarray) -> np.ndarray:
        if state.lengths.max() >= state.capacity:
            raise ValueError(f"KV cache full ({state.capacity} positions)")
        if state.steps is None:
            state.steps = self.step_binding(state.past)
        logits = state.steps.run(tokens, state.lengths)
        state.lengths = state.lengths + 1
        return logits
