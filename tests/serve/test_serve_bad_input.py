"""Every bad input we know of gets the right status and an OpenAI-style error body naming the field.

``LLMOPT_UPDATE_DOCS=1 pytest tests/serve/test_serve_bad_input.py`` rewrites the table in
docs/serve.md from what the server actually answered.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from serve_util import MODEL

pytestmark = pytest.mark.slow

C, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
LONG = "hello " * 3000  # ~3000 tokens; the test server's context window is 2048


def comp(**kw):
    return {"model": MODEL, "prompt": "hi", **kw}


def chat(**kw):
    return {"model": MODEL, "messages": MSG, **kw}


# (case, method, path, body: dict | bytes | None, headers, status, param)
CASES = [
    ("unknown model", "POST", C, {"model": "gpt-4", "prompt": "hi"}, None, 400, "model"),
    ("model missing", "POST", C, {"prompt": "hi"}, None, 400, "model"),
    ("malformed JSON", "POST", C, b'{"model": "x", "prompt": ', None, 400, None),
    ("body is a JSON array", "POST", C, b"[1, 2]", None, 400, None),
    ("empty body", "POST", C, b"", None, 400, None),
    ("prompt missing", "POST", C, {"model": MODEL}, None, 400, "prompt"),
    ("prompt of wrong type", "POST", C, comp(prompt=[1, "a"]), None, 400, "prompt"),
    ("empty prompt", "POST", C, comp(prompt=""), None, 400, "prompt"),
    ("empty token list", "POST", C, comp(prompt=[]), None, 400, "prompt"),
    ("token id outside the vocabulary", "POST", C, comp(prompt=[1, 999999]), None, 400, "prompt"),
    ("prompt longer than the context", "POST", C, comp(prompt=LONG), None, 400, "prompt"),
    ("prompt + max_tokens over the context", "POST", C, comp(max_tokens=5000), None, 400, "max_tokens"),
    ("messages longer than the context", "POST", CHAT, chat(messages=[{"role": "user", "content": LONG}]), None,
     400, "messages"),
    ("max_tokens of wrong type", "POST", C, comp(max_tokens="ten"), None, 400, "max_tokens"),
    ("max_tokens = 0", "POST", C, comp(max_tokens=0), None, 400, "max_tokens"),
    ("max_tokens = 1.5", "POST", C, comp(max_tokens=1.5), None, 400, "max_tokens"),
    ("max_completion_tokens = -1", "POST", CHAT, chat(max_completion_tokens=-1), None, 400,
     "max_completion_tokens"),
    ("max_tokens and max_completion_tokens disagree", "POST", CHAT, chat(max_tokens=5, max_completion_tokens=6),
     None, 400, "max_completion_tokens"),
    ("temperature of wrong type", "POST", C, comp(temperature="hot"), None, 400, "temperature"),
    ("temperature = 3", "POST", C, comp(temperature=3), None, 400, "temperature"),
    ("temperature = -0.5", "POST", CHAT, chat(temperature=-0.5), None, 400, "temperature"),
    ("top_p = 0", "POST", C, comp(top_p=0), None, 400, "top_p"),
    ("top_p = 1.5", "POST", C, comp(top_p=1.5), None, 400, "top_p"),
    ("top_k = -2", "POST", C, comp(top_k=-2), None, 400, "top_k"),
    ("n = 0", "POST", C, comp(n=0), None, 400, "n"),
    ("n = 100", "POST", CHAT, chat(n=100), None, 400, "n"),
    ("seed = 2**64", "POST", C, comp(seed=2**64), None, 400, "seed"),
    ("seed of wrong type", "POST", C, comp(seed="abc"), None, 400, "seed"),
    ("stream of wrong type", "POST", C, comp(stream="yes"), None, 400, "stream"),
    ("logprobs = 21 (completions)", "POST", C, comp(logprobs=21), None, 400, "logprobs"),
    ("top_logprobs = 30", "POST", CHAT, chat(logprobs=True, top_logprobs=30), None, 400, "top_logprobs"),
    ("top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=2), None, 400, "top_logprobs"),
    ("stop of wrong type", "POST", C, comp(stop=123), None, 400, "stop"),
    ("five stop strings", "POST", C, comp(stop=["a", "b", "c", "d", "e"]), None, 400, "stop"),
    ("empty stop string", "POST", C, comp(stop=[""]), None, 400, "stop"),
    ("echo with logprobs", "POST", C, comp(echo=True, logprobs=1), None, 400, "echo"),
    ("best_of != n", "POST", C, comp(best_of=3), None, 400, "best_of"),
    ("presence_penalty (not implemented)", "POST", C, comp(presence_penalty=0.5), None, 400, "presence_penalty"),
    ("tools (not implemented)", "POST", CHAT, chat(tools=[{"type": "function"}]), None, 400, "tools"),
    ("unknown field (typo)", "POST", C, comp(max_token=5), None, 400, "max_token"),
    ("messages missing", "POST", CHAT, {"model": MODEL}, None, 400, "messages"),
    ("messages not a list", "POST", CHAT, chat(messages="hello"), None, 400, "messages"),
    ("empty messages", "POST", CHAT, chat(messages=[]), None, 400, "messages"),
    ("message without content", "POST", CHAT, chat(messages=[{"role": "user"}]), None, 400, "messages.0"),
    ("unknown role", "POST", CHAT, chat(messages=[{"role": "bot", "content": "x"}]), None, 400, "messages.0.role"),
    ("image content part", "POST", CHAT,
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), None, 400,
     "messages.0.content.0.type"),
    ("content of wrong type", "POST", CHAT, chat(messages=[{"role": "user", "content": 5}]), None, 400,
     "messages.0.content"),
    ("no API key", "POST", C, comp(), {"Authorization": ""}, 401, None),
    ("wrong API key", "GET", "/v1/models", None, {"Authorization": "Bearer nope"}, 401, None),
    ("GET on a POST route", "GET", C, None, None, 405, None),
    ("unknown route", "GET", "/v1/nothing", None, None, 404, None),
    ("body over 8 MiB", "POST", C, b"{" + b" " * (8 * 2**20) + b"}", None, 413, None),
    ("text/plain body (a web page's form post)", "POST", C, json.dumps(comp()).encode(),
     {"Content-Type": "text/plain"}, 415, None),
    ("no Content-Type", "POST", C, json.dumps(comp()).encode(), {"Content-Type": ""}, 415, None),
    ("foreign Host header (DNS rebinding)", "GET", "/v1/models", None, {"Host": "evil.example"}, 400, None),
    ("/openapi.json without the API key", "GET", "/openapi.json", None, {"Authorization": ""}, 401, None),
    ("more sequences than the server admits (prompts x n)", "POST", C, comp(prompt=["hi"] * 6, n=16), None, 400,
     "prompt"),
]


@pytest.fixture(scope="module")
def answers(server):
    out = []
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for case, method, path, body, headers, status, param in CASES:
            h = dict(server.headers, **(headers or {}))
            if body is None:
                r = http.request(method, path, headers=h)
            elif isinstance(body, bytes):
                r = http.request(method, path, content=body, headers={"Content-Type": "application/json", **h})
            else:
                r = http.request(method, path, json=body, headers=h)
            out.append((case, method, path, body, r))
    return out


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_bad_input_gets_status_and_openai_error_naming_the_field(answers, i):
    case, method, path, body, headers, status, param = CASES[i]
    r = answers[i][4]
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    if param:
        assert param.split(".")[0] in err["message"]
    if case.endswith("the context"):
        assert "2048" in err["message"] and "tokens" in err["message"]


def test_server_healthy_after_bad_inputs(server, answers):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def _short(body) -> str:
    if body is None:
        return ""
    if isinstance(body, bytes):
        s = body.decode(errors="replace")
        return f"{len(body)} bytes" if len(s) > 60 else (repr(s) if s else "(empty)")
    b = {k: v for k, v in body.items() if k != "model" or v != MODEL}
    s = json.dumps(b)
    return s if len(s) <= 70 else s[:67] + "..."


def test_write_bad_input_table_to_docs(answers):
    if os.environ.get("LLMOPT_UPDATE_DOCS") != "1":
        pytest.skip("set LLMOPT_UPDATE_DOCS=1 to rewrite the table in docs/serve.md")
    rows = ["| case | request | status | error message (`param`) |", "|---|---|---|---|"]
    for case, method, path, body, r in answers:
        err = r.json()["error"]
        msg = err["message"].replace("|", "\\|").replace("\n", " ")
        req = f"`{method} {path}` " + (f"`{_short(body)}`" if _short(body) else "")
        rows.append(f"| {case} | {req.replace('|', chr(92) + '|')} | {r.status_code} | {msg} "
                    f"(`{err['param']}`) |")
    doc = Path(__file__).resolve().parents[2] / "docs" / "serve.md"
    start, end = "<!-- bad-input-table:start -->", "<!-- bad-input-table:end -->"
    text = doc.read_text()
    assert start in text and end in text
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(head + start + "\n" + "\n".join(rows) + "\n" + end + tail)
