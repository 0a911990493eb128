"""The primitive prefix reuse and chunked prefill stand on: prompt tokens prefilled after positions
already in a slot (onnxruntime's GroupQueryAttention with per-row ``query_seqlens``), ragged rows
in one call, and decode steps in which some rows sit idle. Run on the CPU graphs, fp32 and int8
weights, an fp32 and an int8 KV cache."""

import numpy as np
import pytest
from click.testing import CliRunner

from cpm_deploy.cli.export import main as export_cli
from cpm_deploy.exporter.quality import GATES, KV_GATE
from cpm_deploy.exporter.verify import mean_kl
from cpm_deploy.runtime import CPMGenerator
from cpm_deploy.runtime.backends import ort_decoder

ROWS = [list(range(100, 141)), list(range(300, 323)), list(range(500, 537))]  # 41, 23 and 37 tokens
SPLITS = [16, 5, 30]  # each row's tokens already in its slot before the continuation


@pytest.fixture(scope="module")
def kv8_bundle(tmp_path_factory, trained_hf):
    out = tmp_path_factory.mktemp("kv8c") / "bundle"
    r = CliRunner().invoke(export_cli, [str(trained_hf), str(out), "-q", "-P", "fp32", "-P", "int8",
                                        "--variants-only", "--kv-cache", "int8"])
    assert r.exit_code == 0, r.output
    return out


def _whole_and_continued(dec, rows, splits, chunk=None, monkeypatch=None):
    pool_a, pool_b = dec.kv_pool(len(rows), 64), dec.kv_pool(len(rows), 64)
    whole = dec.run_prefill(rows, pool_a.views(0, len(rows)))
    if chunk:
        monkeypatch.setattr(ort_decoder, "PREFILL_CHUNK", chunk)
    dec.run_prefill([r[:s] for r, s in zip(rows, splits)], pool_b.views(0, len(rows)))
    continued = dec.run_prefill([r[s:] for r, s in zip(rows, splits)], pool_b.views(0, len(rows)),
                                cached=np.array(splits))
    return whole, continued, pool_a, pool_b


def test_a_continuation_equals_the_whole_prompt_on_fp32(trained_generator, monkeypatch):
    dec = trained_generator.decoder  # cpu-fp32
    whole, continued, a, b = _whole_and_continued(dec, ROWS, SPLITS, chunk=8, monkeypatch=monkeypatch)
    np.testing.assert_allclose(continued, whole, atol=1e-4, rtol=1e-4)
    assert (continued.argmax(-1) == whole.argmax(-1)).all()
    for x, y in zip(a.buffers, b.buffers):
        for row, r in enumerate(ROWS):
            np.testing.assert_allclose(y[row, :, :len(r)], x[row, :, :len(r)], atol=1e-4, rtol=1e-4)


def test_ragged_rows_in_chunks_equal_one_call(trained_generator, monkeypatch):
    dec = trained_generator.decoder
    pool_a, pool_b = dec.kv_pool(3, 64), dec.kv_pool(3, 64)
    whole = dec.run_prefill(ROWS, pool_a.views(0, 3))
    monkeypatch.setattr(ort_decoder, "PREFILL_CHUNK", 7)  # rows end in different chunks
    chunked = dec.run_prefill(ROWS, pool_b.views(0, 3))
    np.testing.assert_allclose(chunked, whole, atol=1e-4, rtol=1e-4)


def test_idle_rows_keep_their_cache_and_leave_the_others_unchanged(trained_generator):
    dec = trained_generator.decoder
    pool = dec.kv_pool(2, 64)
    dec.run_prefill([ROWS[0][:20], ROWS[1][:9]], pool.views(0, 2))
    before = [b[1, :, :12].copy() for b in pool.buffers]
    step = dec.step_binding(pool.views(0, 2))
    got = step.run(np.array([7, 8]), np.array([20, 9]), idle=np.array([False, True]))
    for b, kept in zip(pool.buffers, before):
        np.testing.assert_array_equal(b[1, :, :12], kept)  # nothing written at position 9 or before
    alone = dec.kv_pool(1, 64)
    dec.run_prefill([ROWS[0][:20]], alone.views(0, 1))
    want = dec.step_binding(alone.views(0, 1)).run(np.array([7]), np.array([20]))
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("graph, kv, gate", [
    ("cpu-fp32", "int8", KV_GATE),  # the prefix read back from the int8 cache, where one call has it in float
    ("cpu-int8", "fp32", GATES["int8"]),  # activations quantized per call: the prefix's and the suffix's apart
    ("cpu-int8", "int8", GATES["int8"]),
])
def test_a_continuation_stays_within_its_graph_s_gate(trained_bundle, kv8_bundle, graph, kv, gate):
    """Where a continuation cannot equal one call, the gap (mean KL of the last position's
    distributions) is held to the gate the graph itself passed at export."""
    dec = CPMGenerator.from_bundle(kv8_bundle if kv == "int8" else trained_bundle, variant=graph, threads=1).decoder
    whole, continued, _, _ = _whole_and_continued(dec, ROWS, SPLITS)
    assert mean_kl(whole, continued) <= gate["max_mean_kl"]
