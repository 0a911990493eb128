"""Transparent huge pages under the weights onnxruntime holds (Linux 6.1+; elsewhere a no-op).

A decode step streams every weight once per token. onnxruntime keeps its weights (prepacked for
its kernels) in plain ``malloc`` memory, which under the usual ``madvise`` THP setting stays on
4 KiB pages: a TLB miss every 4 KiB of a step's hundreds of megabytes. The anonymous memory
mapped while a decoder's sessions are created is collapsed into 2 MiB pages (``MADV_COLLAPSE``)
by a low-priority background thread, so loading does not wait for it (a server's warm-up does:
``Decoder.settle``), and the kernel keeps the memory's contents while it works. Decode steps get
faster by roughly a tenth (docs/design.md). ``CPM_DEPLOY_HUGE_PAGES=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from pathlib import Path

MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
THP = Path("/sys/kernel/mm/transparent_hugepage")
# less new memory than this is left alone: the TLB covers it on 4 KiB pages already (a second-level
# TLB of 1.5-2k entries maps 6-8 MB), and test-sized models would pay the collapse for nothing
MIN_NEW_BYTES = 32 << 20


def available() -> bool:
    """Linux with transparent huge pages not switched off, and not turned off by the user."""
    if sys.platform != "linux" or os.environ.get("CPM_DEPLOY_HUGE_PAGES", "1") == "0":
        return False
    try:
        return "[never]" not in (THP / "enabled").read_text()
    except OSError:
        return False


def huge_page_size() -> int:
    try:
        return int((THP / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 2 << 20


def anonymous_regions(heap: bool = False) -> list[tuple[int, int]]:
    """[start, end) of this process's private, writable, unnamed mappings (malloc's big chunks and
    its threads' arenas), or with ``heap`` the main heap."""
    regions = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            name = fields[5] if len(fields) > 5 else ""
            if fields[1] == "rw-p" and name == ("[heap]" if heap else ""):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                regions.append((start, end))
    return regions


def new_ranges(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``after`` that no region of ``before`` covered (the kernel merges a new mapping
    into an old neighbour's region: only the new part is ours)."""
    out = []
    for start, end in after:
        for old_start, old_end in sorted(before):
            if old_end <= start or old_start >= end:
                continue
            if old_start > start:
                out.append((start, old_start))
            start = max(start, old_end)
            if start >= end:
                break
        if start < end:
            out.append((start, end))
    return out


class Collapse:
    """Collapses the 2 MiB-aligned interior of each region, in a daemon thread at the lowest priority."""

    def __init__(self, regions: list[tuple[int, int]]):
        size = huge_page_size()
        self.ranges = [(a, b) for a, b in (((s + size - 1) // size * size, e // size * size) for s, e in regions)
                       if b > a]
        self.collapsed = 0  # bytes now on huge pages
        self.refused = 0  # bytes the kernel would not collapse (thread stacks, memory in use elsewhere)
        self._thread = threading.Thread(target=self._run, name="cpm-huge-pages", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only, on Linux
        except OSError:
            pass
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        for start, end in self.ranges:
            libc.madvise(start, end - start, MADV_HUGEPAGE)  # and khugepaged keeps it so
            if libc.madvise(start, end - start, MADV_COLLAPSE) == 0:
                self.collapsed += end - start
            else:
                self.refused += end - start

    def join(self, timeout: float | None = None) -> "Collapse":
        self._thread.join(timeout)
        return self


def snapshot() -> list[tuple[int, int]] | None:
    """The anonymous regions now, to compare with after creating sessions (None: not available)."""
    return anonymous_regions() if available() else None


def collapse_since(before: list[tuple[int, int]] | None) -> Collapse | None:
    """Start collapsing the anonymous memory mapped since ``before`` was taken, and the main heap:
    once glibc's mmap threshold has moved (it follows the largest chunk freed), weights land there,
    in space that earlier work may have left free (it stays populated: collapsing adds no memory)."""
    if before is None:
        return None
    new = new_ranges(before, anonymous_regions())
    if sum(end - start for start, end in new) < MIN_NEW_BYTES:
        return None
    return Collapse(new + anonymous_regions(heap=True))
