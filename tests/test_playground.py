"""The playground page at / in a real browser: Debian's Chromium driven by Playwright (its own
browser download cannot run here, so ``executable_path`` points at the system one). The server
decodes slowly on purpose (a short sleep per step), so a run is still streaming when it is watched
or stopped. CPM_PLAYGROUND_SCREENSHOT=FILE saves the README's screenshot."""

import math
import os
import shutil
import time

import httpx
import pytest

from serve_helpers import metric, serve_in_thread

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is installed with the [test] extra")
CHROMIUM = next((p for p in (os.environ.get("CPM_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium")
                 if p and os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium (.ci/run does)")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "清华大学是中国著名的"


@pytest.fixture(scope="module")
def engine(trained_bundle):
    from cpm_deploy.engine import Engine

    e = Engine.from_bundle(trained_bundle, graph="cpu-fp32", threads=1, max_batch=4).start()
    decode = e.runner.decode
    e.runner.decode = lambda *a, **k: (time.sleep(0.03), decode(*a, **k))[1]  # ~30 tokens/s: watchable
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def server(engine, trained_bundle):
    from cpm_deploy.serve.app import ServerConfig, create_app

    with serve_in_thread(create_app(ServerConfig(trained_bundle, model_name="cpm"), engine)) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(bypass_csp=True)  # the page's CSP forbids the eval Playwright waits with
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('model').textContent.length > 0")
    yield page
    assert errors == []  # the page never logs an error, whatever the test did
    page.close()


def settings(page, max_tokens: int, show_tokens: bool = False):
    page.fill("#prompt", PROMPT)
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#temperature", "0")
    if show_tokens:
        page.check("#show-tokens")


def finished(page):
    page.wait_for_function("['done', 'stopped'].includes(document.getElementById('message').textContent)",
                           timeout=60000)


def test_a_greedy_run_shows_the_text_the_api_returns(page, server):
    assert page.title() == "CPM playground" and page.text_content("#model") == "cpm"
    settings(page, 24)
    page.click("#run")
    finished(page)
    api = httpx.post(f"{server}/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0},
                     timeout=60).json()["choices"][0]["text"]
    assert page.get_attribute("#output", "data-text") == api
    assert page.text_content("#output") == PROMPT + api
    assert "TTFT" in page.text_content("#stats") and "tokens/s" in page.text_content("#stats")
    if path := os.environ.get("CPM_PLAYGROUND_SCREENSHOT"):
        page.check("#show-tokens")
        page.click("#run")
        finished(page)
        page.hover("#output .tok >> nth=2")
        page.screenshot(path=path)


def test_streaming_shows_text_before_the_end_and_stop_cancels_on_the_server(page, server, engine):
    engine.generator.eod_id = -1  # runs its whole length unless stopped
    try:
        settings(page, 100)
        page.click("#run")
        page.wait_for_function("document.getElementById('output').textContent.length > "
                               f"{len(PROMPT)} + 3")  # partial text, streamed
        assert page.is_enabled("#stop-run") and page.text_content("#message") != "done"
        assert metric(server, "cpm_running_sequences") == 1
        page.click("#stop-run")
        finished(page)
        assert page.text_content("#message") == "stopped"
        deadline = time.time() + 5  # the server drops the sequence at its next step
        while metric(server, "cpm_running_sequences") and time.time() < deadline:
            time.sleep(0.05)
        assert metric(server, "cpm_running_sequences") == 0
        assert metric(server, "cpm_requests_total", 'outcome="cancelled"') >= 1
    finally:
        engine.generator.eod_id = 7


def test_the_token_view_shows_the_api_s_probabilities(page, server):
    settings(page, 10, show_tokens=True)
    page.click("#run")
    finished(page)
    shown = page.eval_on_selector_all("#output .tok", "els => els.map(e => [e.textContent, +e.dataset.prob, e.dataset.tip])")
    api = httpx.post(f"{server}/v1/completions", json={"prompt": PROMPT, "max_tokens": 10, "temperature": 0,
                                                      "logprobs": 5}, timeout=60).json()["choices"][0]["logprobs"]
    assert [t for t, _, _ in shown] == api["tokens"]
    for (_, prob, tip), lp, top in zip(shown, api["token_logprobs"], api["top_logprobs"]):
        assert prob == pytest.approx(math.exp(lp), abs=1e-4)
        assert tip.count("\n") == len(top)  # p, then each alternative


def test_a_server_with_a_key_shows_the_key_field_and_then_serves(browser, engine, trained_bundle):
    from cpm_deploy.serve.app import ServerConfig, create_app

    with serve_in_thread(create_app(ServerConfig(trained_bundle, model_name="cpm", api_key="sesame"), engine)) as base:
        page = browser.new_page(bypass_csp=True)  # the page's CSP forbids the eval Playwright waits with
        page.goto(base + "/")
        page.wait_for_selector("#keybox.shown")
        assert "API key" in page.text_content("#message")
        page.fill("#key", "sesame")
        settings(page, 4)
        page.click("#run")
        finished(page)
        assert page.text_content("#message") == "done" and len(page.text_content("#output")) > len(PROMPT)
        page.close()


def test_the_page_fits_a_phone_and_can_be_turned_off(browser, server, trained_bundle, engine):
    from cpm_deploy.serve.app import ServerConfig, create_app

    phone = browser.new_page(viewport={"width": 390, "height": 844}, bypass_csp=True)
    phone.goto(server + "/")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    assert phone.is_visible("#run") and phone.is_visible("#prompt")
    phone.close()
    with serve_in_thread(create_app(ServerConfig(trained_bundle, playground=False), engine)) as base:
        assert httpx.get(base + "/", timeout=10).status_code == 404
