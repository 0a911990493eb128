"""Will a server's weights and KV pool fit in this machine's memory? Asked before anything is
allocated, so a pool too large is refused in one line instead of the process being killed later."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CPMError
from ..bundle.reader import Bundle

HEADROOM = 1.15  # onnxruntime's arenas, activations, Python: what the weights and the pool leave out
RESERVE = 512 << 20  # and a little for everything else on the machine


class MemoryBudgetError(CPMError, ValueError):
    """The weights and KV pool asked for do not fit (the message names settings that do)."""


@dataclass(frozen=True)
class ServingMemory:
    weights: int  # bytes of the graph files the server loads
    per_position: int  # KV bytes of one position of one sequence, every layer, keys and values
    available: int | None  # bytes this process may still use (None: unknown here)

    def pool(self, max_batch: int, capacity: int, prefix_tokens: int = 0) -> int:
        """Slots for ``max_batch`` sequences of ``capacity`` positions, and a prefix store of
        ``prefix_tokens`` positions."""
        return (max_batch * capacity + prefix_tokens) * self.per_position

    def need(self, max_batch: int, capacity: int, prefix_tokens: int = 0) -> int:
        return int((self.weights + self.pool(max_batch, capacity, prefix_tokens)) * HEADROOM) + RESERVE

    def check(self, max_batch: int, capacity: int, what: str, prefix_tokens: int = 0) -> None:
        if self.available is None:
            return
        need = self.need(max_batch, capacity, prefix_tokens)
        if need <= self.available:
            return
        batch_fit = self._largest(lambda b: self.need(b, capacity, prefix_tokens))
        total_fit = self._largest(lambda t: self.need(max_batch, t, prefix_tokens))
        fits = [f"--max-batch {batch_fit} (at {capacity} positions)"] if batch_fit >= 1 else []
        fits += [f"--max-total {total_fit} (at --max-batch {max_batch})"] if total_fit >= 2 else []
        if prefix_tokens and self.need(max_batch, capacity) <= self.available:
            fits += [f"--prefix-cache-tokens {self._largest(lambda p: self.need(max_batch, capacity, p))}"]
        store = f" + {prefix_tokens} prefix-cache positions" if prefix_tokens else ""
        raise MemoryBudgetError(
            f"{what}: weights {_gb(self.weights)} + KV pool {_gb(self.pool(max_batch, capacity, prefix_tokens))} "
            f"({max_batch} sequences x {capacity} positions{store}) need about {_gb(need)}, and "
            f"{_gb(self.available)} is available; "
            + (f"what fits: {' or '.join(fits)}" if fits else "not even one sequence fits: use a smaller graph"))


    def _largest(self, need) -> int:
        """The largest n >= 0 with need(n) within what is available (need grows with n)."""
        low, high = 0, 1
        while need(high) <= self.available:
            low, high = high, high * 2
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if need(mid) <= self.available else (low, mid)
        return low


def serving_memory(bundle: Bundle, graph: str) -> ServingMemory:
    """What serving ``graph`` of ``bundle`` needs: its weight files, and its KV cache per position."""
    cfg = bundle.config
    files = {f for f in bundle.graph_files(graph) if f != (bundle.manifest.get("tokenizer") or {}).get("file")}
    weights = sum(bundle.manifest["files"][f]["bytes"] for f in files)
    per_position = cfg["n_layer"] * 2 * cfg["n_embd"] * bundle.kv_bytes(graph)
    return ServingMemory(weights, per_position, available_bytes())


def available_bytes() -> int | None:
    """MemAvailable, lowered to the cgroup's limit when one is set (containers); None if unknown."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap = Path(limit).read_text().strip()
            if cap != "max" and int(cap) < 1 << 60:
                available = min(available, int(cap) - int(Path(used).read_text()))
        except (OSError, ValueError):
            continue
    return available


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"
