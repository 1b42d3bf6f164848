"""The real server with the embedded model, driven by the official ``openai`` client."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serve_util import API_KEY, MODEL

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]


def together(*calls):
    """Run the calls concurrently (the server batches them) and return their results in order."""
    with ThreadPoolExecutor(len(calls)) as ex:
        return [f.result() for f in [ex.submit(c) for c in calls]]


def test_models_lists_the_served_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_completion_greedy_text_usage_and_finish_reason(client):
    r, again = together(*[lambda: client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                                             temperature=0)] * 2)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    c = r.choices[0]
    assert c.finish_reason in ("length", "stop") and "Paris" in c.text
    assert r.usage.prompt_tokens == 5 and 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert again.choices[0].text == c.text


def test_chat_completion_answers_as_assistant(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=12, temperature=0)
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content.strip()
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 10


def test_streamed_completion_equals_non_streamed(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    whole, chunks = together(lambda: client.completions.create(**kw), lambda: list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_chat_equals_non_streamed(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    whole, chunks = together(lambda: client.chat.completions.create(**kw),
                             lambda: list(client.chat.completions.create(stream=True, **kw)))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_sse_ends_with_done(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_completion_logprobs_top_n(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert val <= 0 and 3 <= len(top) <= 4 and tok in top
        assert math.isclose(top[tok], val, abs_tol=1e-5) and val >= max(top.values()) - 1e-5  # greedy = argmax


def test_chat_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode())
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
    streamed = [c for c in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0,
                                                          logprobs=True, top_logprobs=2, stream=True)]
    lps = [t.logprob for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert lps == pytest.approx([t.logprob for t in content], abs=1e-5)


def test_stop_string_cuts_text_streamed_and_not(client):
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
    stop = base[len(base) // 2:len(base) // 2 + 3]  # a string the greedy text certainly contains
    assert stop.strip()
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stop=[stop, "zzz"])
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.text == base[:base.index(stop)] and stop not in c.text
    streamed = "".join(x.choices[0].text for x in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stop=[stop, "zzz"], stream=True) if x.choices)
    assert streamed == c.text


def test_seed_reproduces_sampled_text(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, top_p=0.95)
    a, b, *rest = together(*[lambda s=s: client.completions.create(seed=s, **kw).choices[0].text
                              for s in (1234, 1234, 1, 2, 3)])
    others = set(rest)
    assert a == b
    assert len(others | {a}) > 1  # different seeds sample different texts


def test_n_choices_with_seed_differ_and_reproduce(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=10, temperature=1.0, n=3, seed=7, logprobs=True)
    r1, r2, single = together(lambda: client.chat.completions.create(**kw),
                              lambda: client.chat.completions.create(**kw),
                              lambda: client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1))
    assert [c.index for c in r1.choices] == [0, 1, 2]
    t1 = [c.message.content for c in r1.choices]
    assert t1 == [c.message.content for c in r2.choices] and len(set(t1)) > 1
    # usage: the prompt counts once, completion tokens add up over the choices
    assert r1.usage.completion_tokens == sum(len(c.logprobs.content) for c in r1.choices)
    assert r1.usage.prompt_tokens == single.usage.prompt_tokens


def test_top_k_extension_one_is_greedy(client):
    greedy, topk1 = together(
        lambda: client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0),
        lambda: client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5,
                                          extra_body={"top_k": 1}))
    assert topk1.choices[0].text == greedy.choices[0].text


def test_token_id_prompt_and_batched_prompts(client):
    one, r, ids = together(
        lambda: client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0),
        lambda: client.completions.create(model=MODEL, prompt=[PROMPT, "1, 2, 3,"], max_tokens=4, temperature=0),
        lambda: client.completions.create(model=MODEL, prompt=[504, 3575, 282, 4649, 314], max_tokens=4,
                                          temperature=0, echo=True))
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == one.choices[0].text
    assert r.usage.prompt_tokens > one.usage.prompt_tokens  # both prompts count
    assert ids.choices[0].text.startswith(PROMPT)  # echo decodes the token-id prompt


def test_wrong_api_key_is_401(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200  # /health and /metrics need no key
    assert API_KEY not in httpx.get(f"{server.url}/metrics").text
