"""A real ``llmopt serve`` subprocess for the serving benchmarks: started on a free loopback port
from this checkout, returned once ``/health`` answers 200."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, args: list[str], log_path: Path,
                 timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """``llmopt serve MODEL --port P *args --log-level warning``, output to ``log_path``; returns
    the process and its base URL. Exits with the log's tail if the server dies or is not healthy
    within ``timeout`` seconds."""
    port = free_port()
    cmd = [sys.executable, "-m", "llmopt.cli", "serve", model, "--port", str(port), *args, "--log-level", "warning"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not become healthy in {timeout:.0f} s; see {log_path}")
