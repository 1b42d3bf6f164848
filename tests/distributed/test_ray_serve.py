"""``llmopt serve --replicas 2`` on a real Ray cluster: a real server process on loopback joins the
session's cluster by address, two replicas of a tiny model answer real HTTP requests (streaming and
not), a conversation's next turn returns to the replica that holds its prefix, /metrics sums the
replicas; plus the router's choices on their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from llmopt.distributed.replicas import PrefixRouter
from tests.conftest import save_hf_dir, tiny_hf_model
from tests.serve.serve_util import free_port, metrics, wait_healthy

ROOT = Path(__file__).resolve().parents[2]


# ---- the router alone ---------------------------------------------------------------------------

def test_router_keeps_a_prefix_on_its_replica_and_spreads_new_ones():
    r = PrefixRouter(2, block_size=4)
    a1 = list(range(100, 120))
    b1 = list(range(200, 220))
    assert r.choose(a1, load=[0, 0]) == 0
    assert r.choose(b1, load=[0, 0]) == 1  # nothing cached anywhere: the one sent fewer requests
    r.learn(0, a1 + [7, 7, 7, 7])  # a1 finished with its answer
    a2 = a1 + [7, 7, 7, 7] + list(range(300, 310))  # the next turn repeats prompt and answer
    assert r.choose(a2, load=[5, 0]) == 0  # its prefix wins over the idle replica
    assert r.choose(b1 + [1] * 40, load=[0, 3]) == 0  # a short shared prefix does not: least loaded wins


def test_router_skips_dead_replicas():
    r = PrefixRouter(3, block_size=4)
    a = list(range(40))
    assert r.choose(a, load=[0, 0, 0]) == 0
    assert r.choose(a, load=[0, 0, 0], alive=[False, True, True]) in (1, 2)


# ---- a real server --------------------------------------------------------------------------------

def per_replica(m: dict[str, float], name: str) -> list[float]:
    return [m[f'{name}{{replica="{i}"}}'] for i in range(2)]


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    model = save_hf_dir(tiny_hf_model("llama"), tmp_path_factory.mktemp("tiny") / "llama")
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "llmopt.cli", "serve", str(model), "--port", str(port), "--replicas", "2",
           "--ray", ray_cluster.address, "--num-threads", "1", "--kv-cache-gb", "0.05", "--max-model-len", "512",
           "--log-level", "warning", "--served-model-name", "tiny"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    try:  # a busy shared machine: imports + 2 loads
        wait_healthy(url, proc=proc, log=lambda: log_path.read_text()[-3000:], timeout=480)
    except RuntimeError as e:
        proc.kill()
        pytest.fail(str(e))
    yield url
    proc.terminate()
    assert proc.wait(60) == 0, log_path.read_text()[-3000:]


def chat(url: str, messages: list[dict], **extra) -> dict:
    body = {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **extra}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def routed(url: str) -> list[float]:
    return per_replica(metrics(url), "llmopt_replica_routed_requests")


def test_conversations_stay_on_the_replica_that_caches_their_prefix(server):
    sys_a = "You are helper A. " * 8  # ~140 byte-level tokens: several full KV blocks
    sys_b = "Different system prompt, B. " * 5
    before = routed(server)
    a1 = [{"role": "system", "content": sys_a}, {"role": "user", "content": "first question"}]
    ans = chat(server, a1)["choices"][0]["message"]["content"]
    after_a = routed(server)
    rep_a = [i for i in range(2) if after_a[i] > before[i]]
    assert len(rep_a) == 1
    chat(server, [{"role": "system", "content": sys_b}, {"role": "user", "content": "other question"}])
    after_b = routed(server)
    assert after_b[1 - rep_a[0]] == after_a[1 - rep_a[0]] + 1  # a new conversation goes to the other one
    m0 = metrics(server)
    a2 = a1 + [{"role": "assistant", "content": ans}, {"role": "user", "content": "and a second one"}]
    usage = chat(server, a2)["usage"]
    m1 = metrics(server)
    r = rep_a[0]
    assert per_replica(m1, "llmopt_replica_routed_requests")[r] == after_b[r] + 1  # turn 2: same replica
    computed = (per_replica(m1, "llmopt_replica_computed_prefill_tokens")[r]
                - per_replica(m0, "llmopt_replica_computed_prefill_tokens")[r])
    assert computed < usage["prompt_tokens"] / 2  # its prefix came from that replica's cache


def test_streaming_and_plain_answers_agree_and_metrics_add_up(server):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    plain = httpx.post(f"{server}/v1/completions", json=body, timeout=120)
    assert plain.status_code == 200, plain.text
    text = plain.json()["choices"][0]["text"]
    chunks = []
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[len("data: "):])
    assert chunks[-1] == "[DONE]"
    streamed = "".join(c["choices"][0]["text"] for c in map(json.loads, chunks[:-1]) if c["choices"])
    assert streamed == text and len(text) > 0
    # several requests at once, spread over both replicas
    import concurrent.futures as cf

    prompts = [f"Story number {i} begins" for i in range(6)]
    with cf.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda p: httpx.post(f"{server}/v1/completions", json={**body, "prompt": p},
                                                   timeout=120).status_code, prompts))
    assert codes == [200] * 6
    m = metrics(server)
    gen = per_replica(m, "llmopt_replica_generation_tokens")
    assert all(g > 0 for g in gen)
    assert m["llmopt_generation_tokens_total"] == sum(gen)
    assert per_replica(m, "llmopt_replica_alive") == [1.0, 1.0]
    health = httpx.get(f"{server}/health", timeout=10).json()
    assert health["status"] == "ok"
