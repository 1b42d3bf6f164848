"""Hostile-but-fair clients against a real uvicorn server on loopback (a tiny random-weight llama in
a thread of this process, so its memory is this process's): huge and slow uploads, uploads cut
short, slow headers, wrong content types and Host headers, requests that can never be admitted,
and a long tokenization that must not block the event loop."""

from __future__ import annotations

import logging
import socket
import threading
import time

import httpx
import pytest

from llmopt.config import EngineConfig
from llmopt.engine.engine import LLMEngine
from llmopt.serve.app import ServeConfig, create_app
from llmopt.serve.connections import uvicorn_config
from serve_util import ThreadServer, metrics

TINY = "tiny-llama"
MIB = 2**20


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from test_serve_faults import _root_conftest

    c = _root_conftest()
    return c.save_hf_dir(c.tiny_hf_model("llama"), tmp_path_factory.mktemp("serve-hard") / "llama")


class Server(ThreadServer):
    """uvicorn (with llmopt's connection limits) serving the tiny model in a thread."""

    def __init__(self, tiny_dir, header_timeout: float = 10.0, max_num_seqs: int = 4, **cfg):
        engine = LLMEngine(str(tiny_dir), EngineConfig(num_threads=1, num_kv_blocks=64, max_model_len=512,
                                                       max_num_seqs=max_num_seqs))
        cfg.setdefault("allowed_hosts", ("localhost", "127.0.0.1", "::1"))
        self.app = create_app(engine, ServeConfig(model_names=[TINY], **cfg))
        super().__init__(self.app, lambda app, host, port: uvicorn_config(app, host, port, header_timeout=header_timeout,
                                                                         log_level="warning"))


@pytest.fixture(scope="module")
def srv(tiny_dir):
    with Server(tiny_dir, header_timeout=1.5, body_timeout=2.0) as s:
        yield s


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _headers(port: int, extra: str) -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"{extra}\r\n").encode()


def _upload(port: int, extra_headers: str, chunk: bytes, max_bytes: int, pause: float = 0.002,
            chunked: bool = False) -> tuple[bytes, int]:
    """Send headers, then ``chunk`` repeatedly (up to ``max_bytes``) until the server answers or closes.
    Returns (the response bytes, body bytes sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(_headers(port, extra_headers))
        s.setblocking(False)
        response = b""
        while sent < max_bytes:
            try:
                data = s.recv(65536)
                if not data:
                    break
                response += data
                if b"\r\n\r\n" in response:
                    break
            except BlockingIOError:
                pass
            try:
                piece = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") if chunked else chunk
                s.sendall(piece)
                sent += len(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                time.sleep(pause)
            time.sleep(pause)
        s.setblocking(True)
        s.settimeout(10)
        try:  # the whole answer: headers, then the body (it may come in a later segment)
            while not _complete(response):
                data = s.recv(65536)
                if not data:
                    break
                response += data
        except OSError:
            pass
    return response, sent


def _complete(response: bytes) -> bool:
    """True once ``response`` holds its headers and as many body bytes as its content-length says."""
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return True


def test_513_mb_content_length_is_refused_before_the_body_is_read(srv):
    before = rss_bytes()
    response, sent = _upload(srv.port, f"Content-Length: {513 * MIB}\r\n", b"x" * MIB, 513 * MIB)
    grown = rss_bytes() - before
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"Content-Length" in response and b"body_too_large" in response
    assert sent < 9 * MIB, f"the client got to send {sent / MIB:.1f} MiB before the 413"
    assert grown < 20 * MIB, f"the server grew by {grown / MIB:.1f} MiB"
    assert httpx.get(f"{srv.url}/health").status_code == 200


def test_chunked_body_is_refused_once_it_passes_the_limit(srv):
    before = rss_bytes()
    response, sent = _upload(srv.port, "Transfer-Encoding: chunked\r\n", b"x" * (256 * 1024), 513 * MIB,
                             pause=0.005, chunked=True)
    grown = rss_bytes() - before
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent < 16 * MIB, f"{sent / MIB:.1f} MiB sent before the 413"
    assert grown < 20 * MIB, f"the server grew by {grown / MIB:.1f} MiB"


def test_client_that_disconnects_mid_upload_is_a_499_logged_in_one_line(srv, caplog):
    m0 = metrics(srv.url)
    with caplog.at_level(logging.INFO):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(_headers(srv.port, f"Content-Length: {MIB}\r\n") + b'{"model": "' + b"x" * 100_000)
            time.sleep(0.3)  # the handler is reading the body
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            m = metrics(srv.url)
            if m.get('llmopt_requests_total{code="499",route="/v1/completions"}', 0) > \
                    m0.get('llmopt_requests_total{code="499",route="/v1/completions"}', 0):
                break
            time.sleep(0.1)
    assert m.get('llmopt_requests_total{code="499",route="/v1/completions"}', 0) == \
        m0.get('llmopt_requests_total{code="499",route="/v1/completions"}', 0) + 1
    assert m.get('llmopt_requests_total{code="500",route="/v1/completions"}', 0) == \
        m0.get('llmopt_requests_total{code="500",route="/v1/completions"}', 0)
    mine = [r for r in caplog.records if "disconnected during the upload" in r.getMessage()]
    assert len(mine) == 1 and mine[0].levelno == logging.INFO and not mine[0].exc_info
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_body_that_arrives_too_slowly_gets_408(srv):
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(_headers(srv.port, "Content-Length: 1000\r\n") + b'{"model"')
        t0 = time.monotonic()
        response = s.recv(65536)
        waited = time.monotonic() - t0
    assert response.startswith(b"HTTP/1.1 408"), response[:200]
    assert 1.5 < waited < 8


def test_slow_headers_get_the_connection_closed(srv):
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n".encode())
        t0 = time.monotonic()
        closed_after = None
        s.settimeout(0.25)
        for i in range(60):  # one header byte every 0.25 s, for up to 15 s
            try:
                s.sendall(b"X")
                if s.recv(65536) == b"":
                    closed_after = time.monotonic() - t0
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - t0
                break
    assert closed_after is not None, "a client trickling headers kept its connection for 15 s"
    assert closed_after < 6
    assert httpx.get(f"{srv.url}/health").status_code == 200


def test_megabyte_of_headers_is_refused(srv):
    # (h11 bounds what it buffers of an incomplete head: 16 KiB, so a head that does not arrive
    # in one read of the socket cannot grow the server)
    before = rss_bytes()
    try:
        r = httpx.get(f"{srv.url}/health", headers={"X-Big": "a" * MIB})
        assert r.status_code == 400
    except (httpx.ReadError, httpx.WriteError):
        pass  # the 400 and the close came while the client was still sending: the server reset it
    assert rss_bytes() - before < 8 * MIB
    assert httpx.get(f"{srv.url}/health").status_code == 200


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""])
def test_non_json_content_types_get_415(srv, ctype):
    r = httpx.post(f"{srv.url}/v1/completions", content=b'{"model": "tiny-llama", "prompt": "hi"}',
                   headers={"Content-Type": ctype})
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type"
    ok = httpx.post(f"{srv.url}/v1/completions", content=b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": 1}',
                    headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("host, status", [("evil.example:80", 400), ("127.0.0.1.nip.io", 400), ("localhost:1", 200),
                                          ("127.0.0.1", 200), ("[::1]:8000", 200)])
def test_loopback_server_answers_only_its_loopback_host_names(srv, host, status):
    r = httpx.get(f"{srv.url}/health", headers={"Host": host})
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["code"] == "host_not_allowed"


def test_api_key_also_guards_the_openapi_schema(tiny_dir):
    with Server(tiny_dir, api_key="k3y") as s:
        assert httpx.get(f"{s.url}/openapi.json").status_code == 401
        assert httpx.get(f"{s.url}/docs").status_code == 401
        assert httpx.get(f"{s.url}/openapi.json", headers={"Authorization": "Bearer k3y"}).status_code == 200
        assert httpx.get(f"{s.url}/health").status_code == 200  # still open, as /metrics
        assert httpx.get(f"{s.url}/metrics").status_code == 200


def test_request_that_can_never_be_admitted_is_a_400_not_a_503(tiny_dir):
    with Server(tiny_dir, max_num_seqs=2, max_queue=2) as s:  # capacity 4
        r = httpx.post(f"{s.url}/v1/completions", json={"model": TINY, "prompt": "hi", "n": 5, "max_tokens": 1})
        assert r.status_code == 400 and "Retry-After" not in r.headers, r.text
        err = r.json()["error"]
        assert err["code"] == "too_many_sequences" and err["param"] == "n" and "at most 4" in err["message"]
        r = httpx.post(f"{s.url}/v1/completions", json={"model": TINY, "prompt": ["hi"] * 5, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = httpx.post(f"{s.url}/v1/chat/completions",
                       json={"model": TINY, "messages": [{"role": "user", "content": "hi"}], "n": 5})
        assert r.status_code == 400
        r = httpx.post(f"{s.url}/v1/completions", json={"model": TINY, "prompt": "hi", "n": 4, "max_tokens": 1})
        assert r.status_code == 200  # exactly the capacity is admissible


def test_health_answers_while_huge_prompts_are_tokenized_and_rejected(srv):
    """Tokenizing an 8 MB prompt takes seconds; it runs off the event loop, so /health keeps
    answering meanwhile. (Latency is reported, not asserted tightly: the machine is shared;
    benchmarks/soak.py reports the p99 under load.)"""
    big = {"model": TINY, "prompt": "hello world " * (8 * MIB // 12 - 100)}
    results = []

    def post():
        results.append(httpx.post(f"{srv.url}/v1/completions", json=big, timeout=300))

    posters = [threading.Thread(target=post)]
    for t in posters:
        t.start()
    lat = []
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        while any(t.is_alive() for t in posters):
            t0 = time.perf_counter()
            assert http.get("/health").status_code == 200
            lat.append(time.perf_counter() - t0)
            time.sleep(0.02)
    for t in posters:
        t.join()
    assert [r.status_code for r in results] == [400], [r.text[:200] for r in results]
    assert "context" in results[0].json()["error"]["message"]
    lat.sort()
    p99 = lat[int(0.99 * (len(lat) - 1))]
    print(f"/health during a rejected 8 MB prompt: n={len(lat)} p50={lat[len(lat) // 2] * 1000:.1f} ms "
          f"p99={p99 * 1000:.1f} ms max={lat[-1] * 1000:.1f} ms")
    assert len(lat) >= 10, "the prompts were rejected too fast to observe /health meanwhile"
    assert lat[-1] < 2.0, f"/health was blocked for {lat[-1]:.1f} s (tokenization on the event loop)"
