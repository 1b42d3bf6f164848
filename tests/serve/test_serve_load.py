"""Load on the real server: many concurrent streams, and clients that walk away mid-stream.
Bounded in count (64 clients, 12 tokens each) and time; loopback only."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from serve_util import MODEL, metrics, wait_for

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Water boils at", "1, 2, 3, 4,", "My favourite food is",
           "The sun rises in the", "Python is a", "The opposite of hot is", "Once upon a time"]
CLIENTS = 64
MAX_TOKENS = 12


async def _stream(aclient, prompt: str) -> tuple[str, str | None]:
    text, finish = "", None
    stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                              stream=True)
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_64_concurrent_streams_match_greedy_text(server, client, aclient):
    expected = {}
    for p, c in zip(PROMPTS, client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=MAX_TOKENS,
                                                        temperature=0).choices):
        expected[p] = c.text
    before = metrics(server.url)

    async def run():
        return await asyncio.gather(*[_stream(aclient, PROMPTS[i % len(PROMPTS)]) for i in range(CLIENTS)],
                                    return_exceptions=True)

    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} clients failed, first: {errors[0]!r}"
    for i, (text, finish) in enumerate(results):
        assert text == expected[PROMPTS[i % len(PROMPTS)]], f"client {i}"
        assert finish in ("length", "stop")
    after = metrics(server.url)
    ok = 'llmopt_requests_total{code="200",route="/v1/completions"}'
    assert after[ok] - before.get(ok, 0) == CLIENTS
    assert after["llmopt_time_to_first_token_seconds_count"] >= CLIENTS
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_clients_that_disconnect_early_free_their_kv_blocks(server, aclient):
    n = 8
    aborted = 'llmopt_request_finish_total{reason="abort"}'
    before = metrics(server.url).get(aborted, 0)

    async def run():
        streams = [await aclient.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=1000,
                                                    temperature=0, stream=True, extra_body={"ignore_eos": True})
                   for i in range(n)]
        for s in streams:  # every request has produced tokens, so it holds KV blocks
            got = 0
            async for _ in s:
                got += 1
                if got == 2:
                    break
        used_mid = metrics(server.url)["llmopt_kv_blocks_used"]
        for s in streams:  # walk away mid-stream
            await s.close()
        return used_mid

    used_mid = asyncio.run(run())
    assert used_mid > 0
    m = wait_for(lambda: (lambda m: m if m["llmopt_kv_blocks_used"] == 0 and m["llmopt_num_requests_running"] == 0
                          else None)(metrics(server.url)), timeout=30)
    assert m, f"KV blocks still in use after the clients left: {metrics(server.url)}"
    assert m["llmopt_requests_in_flight"] == 0
    assert m[aborted] - before == n
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
