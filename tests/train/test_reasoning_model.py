"""The shipped reasoning model: base GGUF + the committed LoRA adapter, loaded by registry name,
answers held-out prompts in the competition format on its own (real model, real engine)."""

from __future__ import annotations

import pytest

from llmopt.models.adapter import AdapterMismatchError, load_adapter, merge_adapter
from llmopt.models.registry import REASONING_MODEL, REGISTRY
from llmopt.reasoning.format import format_ok
from tests.conftest import requires_smollm2


def test_the_adapter_ships_small_and_names_its_base():
    path = REGISTRY[REASONING_MODEL].adapter_path()
    assert path is not None and path.is_file(), "the trained adapter must be committed in the package"
    assert path.stat().st_size < 20 * 2**20  # rank 32 on every layer, fp16: 16 MB, a sixth of the 98 MB base
    ad = load_adapter(path)
    assert ad.base_name == "smollm2-135m-instruct" and ad.rank >= 8 and ad.base_fingerprint


def test_the_adapter_refuses_another_base_model(tiny_models):
    from llmopt.models.loader import load_model

    ad = load_adapter(REGISTRY[REASONING_MODEL].adapter_path())
    with pytest.raises(AdapterMismatchError, match="smollm2-135m-instruct"):
        merge_adapter(load_model(tiny_models["llama"][1]).model, ad)


@requires_smollm2
def test_registry_model_answers_held_out_prompts_in_format_greedily():
    from llmopt import LLM, SamplingParams
    from llmopt.tasks.base import REASONING_SYSTEM_PROMPT
    from llmopt.tasks.mathlogic import logic_suite, math_suite

    # eval-seed items (never trained on): one math and one logic question, each with the
    # competition system prompt and with none, plus a plain question as `make run` asks it
    m = math_suite().items(1, seed=11)[0].messages[-1]["content"]
    lq = logic_suite().items(1, seed=11)[0].messages[-1]["content"]
    convs = [[{"role": "system", "content": REASONING_SYSTEM_PROMPT}, {"role": "user", "content": m}],
             [{"role": "user", "content": lq}],
             [{"role": "system", "content": REASONING_SYSTEM_PROMPT},
              {"role": "user", "content": "What is 17 * 24?"}]]
    llm = LLM(REASONING_MODEL, kv_cache_memory_gb=0.25)
    outs = llm.chat(convs, SamplingParams(max_tokens=160, temperature=0.0))
    for o in outs:
        assert format_ok(o.text), o.text
