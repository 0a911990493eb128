"""The decoder's weights move onto 2 MiB pages in the background, and nothing they compute changes."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from cpm_deploy.runtime import CPMGenerator
from cpm_deploy.runtime.system import huge_pages

MIB = 1 << 20


def _collapse_supported() -> str | None:
    """Why this machine cannot collapse pages, or None."""
    if not huge_pages.available():
        return "no transparent huge pages here (not Linux, or THP set to never)"
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())
    if (major, minor) < (6, 1):
        return f"Linux {os.uname().release} has no MADV_COLLAPSE (6.1+)"
    return None


needs_collapse = pytest.mark.skipif(_collapse_supported() is not None, reason=str(_collapse_supported()))


def _huge_bytes(ranges: list[tuple[int, int]]) -> int:
    """AnonHugePages of this process's mappings that overlap ``ranges``."""
    total, overlaps = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                overlaps = any(start < e and s < end for s, e in ranges)
            elif overlaps and line.startswith("AnonHugePages:"):
                total += int(line.split()[1]) * 1024
    return total


def test_new_ranges_keep_only_what_was_mapped_since():
    before = [(0, 10), (20, 30)]
    after = [(0, 10), (20, 40), (50, 60), (5, 25)]  # unchanged, grown, new, merged over two old ones
    assert huge_pages.new_ranges(before, after) == [(30, 40), (50, 60), (10, 20)]
    assert huge_pages.new_ranges([], [(1, 2)]) == [(1, 2)]


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("CPM_DEPLOY_HUGE_PAGES", "0")
    assert not huge_pages.available()
    assert huge_pages.collapse_since(huge_pages.snapshot()) is None


@needs_collapse
def test_small_memory_is_left_alone():
    """A test-sized model maps a few MB: on 4 KiB pages the TLB covers that already."""
    before = huge_pages.snapshot()
    data = np.ones(huge_pages.MIN_NEW_BYTES // 8, np.int32)  # half the threshold
    assert huge_pages.collapse_since(before) is None
    del data


@needs_collapse
def test_memory_mapped_since_the_snapshot_is_collapsed_with_its_contents():
    before = huge_pages.snapshot()
    data = np.arange(12 * MIB, dtype=np.int32)  # 48 MB, written through; above any mmap threshold
    job = huge_pages.collapse_since(before).join(60)
    start = data.ctypes.data
    mine = [(max(s, start), min(e, start + data.nbytes)) for s, e in job.ranges if s < start + data.nbytes and start < e]
    assert sum(e - s for s, e in mine) >= data.nbytes - 4 * MIB  # all but the unaligned ends
    assert job.collapsed >= 16 * MIB
    assert _huge_bytes(mine) >= 16 * MIB
    assert np.array_equal(data, np.arange(12 * MIB, dtype=np.int32))


@needs_collapse
def test_decoder_weights_collapse_and_its_logits_stay_the_same(trained_bundle, monkeypatch):
    monkeypatch.setattr(huge_pages, "MIN_NEW_BYTES", 0)  # the test model's 8 MB would be left alone
    monkeypatch.setenv("CPM_DEPLOY_HUGE_PAGES", "0")
    plain = CPMGenerator.from_bundle(trained_bundle, variant="cpu-fp32", threads=1)
    assert plain.decoder.huge_pages is None
    monkeypatch.setenv("CPM_DEPLOY_HUGE_PAGES", "1")
    gen = CPMGenerator.from_bundle(trained_bundle, variant="cpu-fp32", threads=1)
    job = gen.decoder.huge_pages.join(60)
    # the tied head alone, prepacked for the MatMul, is 30000 x 64 floats (7.7 MB)
    assert job.collapsed >= 4 * MIB and _huge_bytes(job.ranges) >= 4 * MIB
    ids = [gen.tokenizer.encode("清华大学是中国著名的高等学府")]
    expected, state = plain.decoder.prefill(ids, 24)
    got, state2 = gen.decoder.prefill(ids, 24)
    assert np.array_equal(got, expected)
    token = np.array([int(expected[0].argmax())])
    assert np.array_equal(gen.decoder.step(state2, token), plain.decoder.step(state, token))
