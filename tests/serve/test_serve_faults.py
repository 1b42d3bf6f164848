"""Faults: timeouts, a failing engine step, a dead engine thread, a client that leaves a non-streamed
request. A tiny random-weight llama (built like tests/conftest.py does) behind real uvicorn in a
thread, so the engine can be patched; plus unit tests of the reasoning split and stream holdback."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from llmopt.config import EngineConfig
from llmopt.engine.engine import LLMEngine
from llmopt.serve.app import ServeConfig, _Formatter, create_app, split_reasoning
from serve_util import ThreadServer, metrics, wait_for

TINY = "tiny-llama"


def _root_conftest():
    spec = importlib.util.spec_from_file_location("llmopt_tests_root_conftest",
                                                  Path(__file__).resolve().parents[1] / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    c = _root_conftest()
    return c.save_hf_dir(c.tiny_hf_model("llama"), tmp_path_factory.mktemp("serve-tiny") / "llama")


def tiny_server(tiny_dir, **cfg) -> tuple[ThreadServer, LLMEngine]:
    engine = LLMEngine(str(tiny_dir), EngineConfig(num_threads=1, num_kv_blocks=64, max_model_len=512))
    app = create_app(engine, ServeConfig(model_names=[TINY], **cfg))
    return ThreadServer(app), engine


def slow_steps(engine: LLMEngine, seconds: float) -> None:
    step = engine.step

    def slow():
        time.sleep(seconds)
        return step()

    engine.step = slow


def body(**kw):
    return {"model": TINY, "prompt": "hello", "max_tokens": 400, "ignore_eos": True, "temperature": 0, **kw}


def blocks_free(url: str) -> bool:
    m = metrics(url)
    return m["llmopt_kv_blocks_used"] == 0 and m["llmopt_num_requests_running"] == 0


def test_request_timeout_answers_504_and_frees_blocks(tiny_dir):
    srv, engine = tiny_server(tiny_dir, request_timeout=1.0)
    slow_steps(engine, 0.02)
    with srv:
        t = time.perf_counter()
        r = httpx.post(f"{srv.url}/v1/completions", json=body(), timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert time.perf_counter() - t < 5
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError, match="timed out"):  # streaming: an error event, then [DONE]
            b = body()
            for _ in client.completions.create(stream=True, extra_body={"ignore_eos": b.pop("ignore_eos")}, **b):
                pass
        assert wait_for(lambda: blocks_free(srv.url), timeout=10)
        assert metrics(srv.url)['llmopt_request_finish_total{reason="timeout"}'] == 2


def test_failing_step_fails_its_request_and_engine_recovers(tiny_dir):
    srv, engine = tiny_server(tiny_dir)
    step, calls = engine.step, {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected fault")
        return step()

    engine.step = flaky
    with srv:
        r = httpx.post(f"{srv.url}/v1/completions", json=body(max_tokens=5), timeout=30)
        assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
        r = httpx.post(f"{srv.url}/v1/completions", json=body(max_tokens=5), timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        assert httpx.get(f"{srv.url}/health").status_code == 200
        assert wait_for(lambda: blocks_free(srv.url), timeout=10)


class Boom(BaseException):
    """Something the engine loop cannot survive."""


def test_dead_engine_thread_fails_fast_and_health_says_so(tiny_dir):
    srv, engine = tiny_server(tiny_dir)
    step, calls = engine.step, {"n": 0}

    def dying():
        calls["n"] += 1
        if calls["n"] == 3:
            raise Boom("engine thread killed by the test")
        return step()

    engine.step = dying
    with srv:
        t = time.perf_counter()
        r = httpx.post(f"{srv.url}/v1/completions", json=body(), timeout=30)  # in flight when it dies
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert time.perf_counter() - t < 5
        h = httpx.get(f"{srv.url}/health")
        assert h.status_code == 503 and "killed by the test" in h.json()["error"]
        t = time.perf_counter()
        r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=30,
                       json={"model": TINY, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "died" in r.json()["error"]["message"]
        assert time.perf_counter() - t < 1  # fails fast, no waiting
        assert metrics(srv.url)["llmopt_engine_alive"] == 0


def test_client_leaving_a_non_streamed_request_aborts_it(tiny_dir):
    srv, engine = tiny_server(tiny_dir)
    slow_steps(engine, 0.02)
    with srv:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.url}/v1/completions", json=body(), timeout=1.0)
        assert wait_for(lambda: blocks_free(srv.url), timeout=10)
        m = metrics(srv.url)
        assert m['llmopt_request_finish_total{reason="abort"}'] == 1 and m["llmopt_requests_in_flight"] == 0


def test_chat_and_metrics_on_tiny_model(tiny_dir):
    srv, engine = tiny_server(tiny_dir)
    with srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                           temperature=0, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 4
        m = metrics(srv.url)
        assert m["llmopt_generation_tokens_total"] == 4 and m["llmopt_kv_blocks_total"] == 64
        assert m["llmopt_time_per_output_token_seconds_count"] == 1


# ---- units: the reasoning split and the stream holdback ------------------------------------------

def test_split_reasoning_whole_text():
    assert split_reasoning("<think>a b</think>\n\nanswer") == ("a b", "answer")
    assert split_reasoning("plain answer") == (None, "plain answer")
    assert split_reasoning("thinking still", in_think=True) == ("thinking still", "")
    assert split_reasoning("r</think>c", in_think=True) == ("r", "c")
    assert split_reasoning("  <think>unfinished") == ("unfinished", "")


@pytest.mark.parametrize("text,in_think", [("<think>step 1, step 2</think>\n\nThe answer is 4.", False),
                                           ("no think block here", False),
                                           ("<thin>not a tag</thin> ok", False),
                                           ("r1 </th r2</think>done", True)])
def test_split_reasoning_streamed_pieces_add_up(text, in_think):
    sent_r, sent_c = "", ""
    for i in range(len(text) + 1):
        r, c = split_reasoning(text[:i], in_think, final=i == len(text))
        r = r or ""
        assert r.startswith(sent_r) and c.startswith(sent_c), (i, r, c)
        sent_r, sent_c = max(sent_r, r, key=len), max(sent_c, c, key=len)
    final_r, final_c = split_reasoning(text, in_think)
    assert (sent_r, sent_c) == (final_r or "", final_c)


def _out(text: str, finished: bool, reason=None, released: int | None = None):
    return SimpleNamespace(text=text, finished=finished, finish_reason=reason, logprobs=None, token_ids=[0],
                           released_chars=len(text) if released is None else released)


def test_stream_holds_back_a_partial_stop_string():
    """The text may end in the start of a stop string that a later step cuts off; the engine marks
    only the text before it as released (tests/engine: test_streamed_deltas_never_leak_a_stop_string)
    and the server streams only released text, so the pieces add up to the final text."""
    req = SimpleNamespace(model=TINY, stop=["World"], include_stop_str_in_output=False, stream_options=None)
    server = SimpleNamespace(cfg=SimpleNamespace(reasoning_parser=None))
    fmt = _Formatter(server, req, "cmpl-1", 1, 3, chat=False, prefixes=None, in_think=False)
    steps = [_out("Hello", False), _out("Hello Wo", False, released=6), _out("Hello ", True, "stop")]
    pieces = [ch["choices"][0]["text"] for o in steps for ch in fmt.chunks(0, o)]
    assert "".join(pieces) == "Hello "


def test_reasoning_parser_splits_think_in_stream_and_whole_answer():
    req = SimpleNamespace(model=TINY, stop=None, include_stop_str_in_output=False, stream_options=None)
    server = SimpleNamespace(cfg=SimpleNamespace(reasoning_parser="think"))
    fmt = _Formatter(server, req, "chatcmpl-1", 1, 3, chat=True, prefixes=None, in_think=False)
    steps = [_out("<thi", False), _out("<think>2+2", False), _out("<think>2+2 is 4</th", False),
             _out("<think>2+2 is 4</think>\n\n<answer>4", False),
             _out("<think>2+2 is 4</think>\n\n<answer>4</answer>", True, "stop")]
    deltas = [ch["choices"][0]["delta"] for o in steps for ch in fmt.chunks(0, o)]
    assert "".join(d["reasoning_content"] or "" for d in deltas) == "2+2 is 4"
    assert "".join(d["content"] or "" for d in deltas) == "<answer>4</answer>"
    msg = fmt.final()["choices"][0]["message"]
    assert msg["reasoning_content"] == "2+2 is 4" and msg["content"] == "<answer>4</answer>"
