"""Real servers on loopback for the serving tests: a cpm-serve process, or uvicorn in a thread (for
apps whose engine a test has to reach into). Every wait is bounded."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

CPM_SERVE = Path(sys.executable).parent / "cpm-serve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, timeout: float = 60, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"cpm-serve exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base} did not become ready in {timeout} s")


@contextlib.contextmanager
def serve_process(bundle: Path, *args: str):
    """``cpm-serve BUNDLE ARGS`` on a free loopback port; yields (process, base URL)."""
    port = free_port()
    proc = subprocess.Popen([str(CPM_SERVE), str(bundle), "--port", str(port), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc=proc)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def serve_in_thread(app, ready: bool = True):
    """uvicorn serving ``app`` on a free loopback port in this process; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        if ready:
            wait_ready(base)
        yield base
    finally:
        server.should_exit = True
        thread.join(30)


def metric(base: str, name: str, labels: str = "") -> float:
    """One sample from /metrics (0 when absent)."""
    for line in httpx.get(f"{base}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + (f"{{{labels}}}" if labels else "") + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
