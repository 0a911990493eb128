"""A pool that fits, or a clear refusal: cpm-serve adds the weights and the KV pool before anything
is allocated and, when they do not fit, names --max-batch / --max-total values that do."""

import pytest
from click.testing import CliRunner

from cpm_deploy.runtime import Bundle
from cpm_deploy.runtime.system.memory import HEADROOM, RESERVE, MemoryBudgetError, serving_memory


def test_weights_and_pool_are_counted_from_the_bundle(trained_bundle):
    b = Bundle.open(trained_bundle, verify=False)
    m = serving_memory(b, "cpu-int4")
    files = b.manifest["files"]
    g = b.graph("cpu-int4")  # its int8 prompt graph is loaded too
    assert m.weights == sum(files[f]["bytes"] for f in {g["file"], g["data"], g["prefill"]["file"], g["prefill"]["data"]})
    cfg = b.config
    assert m.per_position == cfg["n_layer"] * 2 * cfg["n_embd"] * 4
    assert m.pool(16, 1024) == 16 * 1024 * m.per_position


def test_a_pool_too_large_is_refused_with_settings_that_fit(trained_bundle, monkeypatch):
    from cpm_deploy.cli.serve import main as serve_cli

    b = Bundle.open(trained_bundle, verify=False)
    m = serving_memory(b, "cpu-fp32")
    capacity = b.config["n_positions"]
    budget = int((m.weights + m.pool(3, capacity)) * HEADROOM) + RESERVE  # room for 3 sequences
    monkeypatch.setattr("cpm_deploy.runtime.system.memory.available_bytes", lambda: budget)
    monkeypatch.setattr("cpm_deploy.serve.app.run", lambda *a, **k: pytest.fail("started a server that cannot fit"))
    r = CliRunner().invoke(serve_cli, [str(trained_bundle), "-g", "cpu-fp32", "--max-batch", "16", "--no-prefix-cache"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "what fits: --max-batch 3 (at " in r.output and f"--max-total {3 * capacity // 16}" in r.output
    m = serving_memory(b, "cpu-fp32")
    m.check(3, capacity, "x")  # the advice holds
    m.check(16, 3 * capacity // 16, "x")
    with pytest.raises(MemoryBudgetError):
        m.check(4, capacity, "x")


def test_nothing_fits_says_so(trained_bundle, monkeypatch):
    monkeypatch.setattr("cpm_deploy.runtime.system.memory.available_bytes", lambda: RESERVE)
    with pytest.raises(MemoryBudgetError, match="not even one sequence fits"):
        serving_memory(Bundle.open(trained_bundle, verify=False), "cpu-fp32").check(1, 1024, "x")


def test_the_prefix_store_is_counted_and_its_size_is_among_the_advice(trained_bundle, monkeypatch):
    from cpm_deploy.cli.serve import main as serve_cli

    b = Bundle.open(trained_bundle, verify=False)
    m = serving_memory(b, "cpu-fp32")
    capacity = b.config["n_positions"]
    assert m.pool(4, capacity, 100) == m.pool(4, capacity) + 100 * m.per_position
    budget = int((m.weights + m.pool(4, capacity, capacity)) * HEADROOM) + RESERVE  # 4 slots and one prompt's prefixes
    monkeypatch.setattr("cpm_deploy.runtime.system.memory.available_bytes", lambda: budget)
    started = []
    monkeypatch.setattr("cpm_deploy.serve.app.run", lambda config, *a: started.append(config))
    r = CliRunner().invoke(serve_cli, [str(trained_bundle), "-g", "cpu-fp32", "--max-batch", "4"])
    assert r.exit_code == 1 and f"+ {2 * capacity} prefix-cache positions" in r.output  # the default: two prompts
    assert f"--prefix-cache-tokens {capacity}" in r.output, r.output
    for flags, kept in ((["--prefix-cache-tokens", str(capacity)], capacity), (["--no-prefix-cache"], 0)):
        r = CliRunner().invoke(serve_cli, [str(trained_bundle), "-g", "cpu-fp32", "--max-batch", "4", *flags])
        assert r.exit_code == 0, r.output
        assert started[-1].prefix_cache_tokens == kept
