"""Think gate: after ``think_gate`` think tokens the engine closes thinking (in place of the last of them) if
their geometric-mean probability is below ``think_gate_threshold``; one look per request. The output up to
there is the one without the gate, and a gate that does not fire changes nothing."""

import math

import pytest

from llmopt import LLM, SamplingParams
from llmopt.reasoning.format import format_ok
from tests.engine.reasoning_util import (
    OPEN_PROMPT,
    PLAIN_PROMPT,
    assert_batched_matches_single,
    plain_and_speculative,
    reasoning_params,
)


def _params(**kw):
    return reasoning_params(60, **kw)


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(str(tiny_models["llama"][1]), kv_cache_memory_gb=0.05, block_size=8)


def _gmean(out, k: int, skip: int = 0) -> float:
    """Geometric-mean probability of output tokens skip .. skip + k - 1 (the first k think tokens)."""
    return math.exp(sum(lp.logprob for lp in out.logprobs[skip:skip + k]) / k)


@pytest.mark.parametrize("k", [1, 5, 12])
@pytest.mark.parametrize("sampled", [False, True])
def test_the_gate_closes_thinking_in_place_of_its_last_token_when_unsure(llm, k, sampled):
    kw = dict(temperature=0.9, seed=7) if sampled else {}
    ref = llm.generate([OPEN_PROMPT], _params(logprobs=0, **kw))[0]  # <think> is in the prompt: all think tokens
    g = _gmean(ref, k)
    out = llm.generate([OPEN_PROMPT], _params(think_gate=k, think_gate_threshold=min(0.999999, g * 1.0001), **kw))[0]
    close = llm.engine.close_ids
    r = out.reasoning
    assert r.closed_by == "think_gate" and r.think_tokens == k - 1 and r.phase == "answer"
    assert out.token_ids[:k - 1] == ref.token_ids[:k - 1]  # the same thinking up to the gate
    assert out.token_ids[k - 1:k - 1 + len(close)] == close  # then the closing text instead of the k-th token
    assert format_ok("<think>" + out.text) or len(out.token_ids) == 60
    assert out.logprobs is None  # the probabilities were used, not returned


def test_a_sure_start_passes_the_gate_and_nothing_changes(llm):
    ref = llm.generate([OPEN_PROMPT], _params(logprobs=0))[0]
    before = llm.engine.stats["think_gate_exits"]
    out = llm.generate([OPEN_PROMPT], _params(think_gate=8, think_gate_threshold=_gmean(ref, 8) * 0.9999))[0]
    assert out.token_ids == ref.token_ids and out.reasoning.closed_by != "think_gate"
    assert llm.engine.stats["think_gate_exits"] == before


def test_the_gate_looks_once_at_its_token_not_later(llm):
    """Tokens after the k-th do not count, however unsure: only the first k think tokens are judged."""
    ref = llm.generate([OPEN_PROMPT], _params(logprobs=0))[0]
    k = 4
    later = min(range(k + 2, len(ref.logprobs) - 20), key=lambda j: ref.logprobs[j].logprob)
    assert math.exp(ref.logprobs[later].logprob) < _gmean(ref, k)  # a less sure token comes later
    out = llm.generate([OPEN_PROMPT], _params(think_gate=k, think_gate_threshold=_gmean(ref, k) * 0.9999))[0]
    assert out.token_ids == ref.token_ids


def test_tokens_before_think_opens_do_not_count(llm):
    """With <think> written by the model, the gate counts from the token after it."""
    prompt = "Why is the sky blue?\n"
    ref = llm.generate([prompt], _params(logprobs=0))[0]
    opened = "<think>" in ref.text
    k = 3
    if not opened:  # the tiny model does not open <think> here: the documented fallback, nothing happens
        out = llm.generate([prompt], _params(think_gate=k, think_gate_threshold=0.999))[0]
        assert out.token_ids == ref.token_ids and out.reasoning.phase == "none"
        return
    start = next(i for i in range(1, len(ref.token_ids) + 1)
                 if llm.engine.tokenizer.decode(ref.token_ids[:i]).startswith("<think>"))
    out = llm.generate([prompt], _params(think_gate=k, think_gate_threshold=min(0.999999, _gmean(ref, k, start) * 1.0001)))[0]
    assert out.reasoning.closed_by == "think_gate" and out.reasoning.think_tokens == start + k - 1


def test_an_output_that_never_thinks_is_left_alone(llm):
    ref = llm.generate([PLAIN_PROMPT], _params())[0]
    out = llm.generate([PLAIN_PROMPT], _params(think_gate=2, think_gate_threshold=0.999))[0]
    if ref.reasoning.phase == "none":
        assert out.reasoning.phase == "none" and out.token_ids == ref.token_ids


def test_batched_think_gate_matches_single(llm):
    prompts = [OPEN_PROMPT, "x<think>", "Why?\n<think>\n", OPEN_PROMPT + " then", PLAIN_PROMPT]
    params = []
    for i, prompt in enumerate(prompts):
        ref = llm.generate([prompt], _params(logprobs=0))[0]
        k = 3 + i
        fire = i % 2 == 0
        g = _gmean(ref, k)
        params.append(_params(think_gate=k, think_gate_threshold=min(0.999999, g * 1.0001) if fire else g * 0.9999,
                              answer_budget=8 if i % 3 == 0 else None, jump_forward=i == 1))
    assert_batched_matches_single(llm, prompts, params, "think_gate", 2)


def test_speculative_decoding_gates_where_plain_decoding_does(tiny_models):
    """Draft tokens the model keeps are counted like sampled ones: the same gate, the same tokens."""
    plain, spec = plain_and_speculative(tiny_models)
    for prompt in (OPEN_PROMPT, "x<think>"):
        ref = plain.generate([prompt], _params(max_tokens=120, logprobs=0))[0]
        for k in (3, 40, 70):
            p = min(0.999999, _gmean(ref, k) * 1.0001)
            a = plain.generate([prompt], _params(max_tokens=120, think_gate=k, think_gate_threshold=p))[0]
            b = spec.generate([prompt], _params(max_tokens=120, think_gate=k, think_gate_threshold=p))[0]
            assert b.token_ids == a.token_ids and b.reasoning.closed_by == a.reasoning.closed_by == "think_gate"
    assert spec.engine.stats["spec_accepted_tokens"] > 0  # drafts were kept (the tiny model loops)


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "8"])
def test_bad_gate_lengths_are_value_errors(value):
    with pytest.raises(ValueError, match="think_gate"):
        SamplingParams(think_gate=value)


@pytest.mark.parametrize("value", [0, 0.0, 1, 1.0, 1.5, -0.2, True, "0.3"])
def test_bad_gate_thresholds_are_value_errors(value):
    with pytest.raises(ValueError, match="think_gate_threshold"):
        SamplingParams(think_gate=8, think_gate_threshold=value)


def test_the_think_gate_cannot_be_combined_with_guided_decoding():
    with pytest.raises(ValueError, match="guided decoding"):
        SamplingParams(think_gate=8, guided_choice=["a", "b"])
