"""Helpers for the serve tests: start a real ``llmopt serve`` subprocess (or an in-process uvicorn
thread) on a free loopback port, wait for /health, read /metrics."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

MODEL = "smollm2-135m-instruct"
API_KEY = "test-key-123"
START_TIMEOUT = 240.0  # the machine is shared: loading can be slow


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProc:
    proc: subprocess.Popen
    port: int
    log_path: Path
    api_key: str | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_server(log_dir: Path, *args: str, api_key: str | None = None) -> ServerProc:
    """``python -m llmopt.cli serve MODEL ...`` on a free port; returns once /health answers 200."""
    port = free_port()
    log_path = log_dir / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "llmopt.cli", "serve", MODEL, "--port", str(port), "--log-level", "warning",
           "--kv-cache-gb", "0.25", "--max-model-len", "2048", "--num-threads", "1", *args]
    if api_key:
        cmd += ["--api-key", api_key]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    srv = ServerProc(proc, port, log_path, api_key)
    wait_healthy(srv.url, proc=proc, log=srv.log_tail)
    return srv


def wait_healthy(url: str, proc: subprocess.Popen | None = None, log=lambda: "",
                 timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was healthy:\n{log()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not healthy after {timeout:.0f} s:\n{log()}")


def metrics(url: str) -> dict[str, float]:
    """/metrics -> {'name{labels}': value} (samples without labels are keyed by the bare name)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"^(\S+?)(\{.*\})?\s+(\S+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def wait_for(pred, timeout: float = 20.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    return last


class ThreadServer:
    """uvicorn serving ``app`` in a thread of this process (for tests that patch the engine)."""

    def __init__(self, app, make_config=None):
        """``make_config(app, host, port)`` builds the ``uvicorn.Config`` (default: plain uvicorn)."""
        import uvicorn

        self.port = free_port()
        config = (make_config(app, "127.0.0.1", self.port) if make_config else
                  uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        wait_healthy(self.url, timeout=60)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
