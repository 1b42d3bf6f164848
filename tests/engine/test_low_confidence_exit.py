"""Low-confidence exit: the engine closes thinking in place of a think token the model chose with a
probability below ``low_confidence_exit``; the output up to there is the one without the exit."""

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


def _first_below(out, p: float) -> int | None:
    """Index of the first output token whose log-probability is below log(p)."""
    return next((i for i, lp in enumerate(out.logprobs) if lp.logprob < math.log(p)), None)


def _threshold_firing_at(out, lo: int = 5, room: int = 30) -> tuple[float, int]:
    """A threshold that first fires at some token >= ``lo`` of ``out`` (with logprobs) that leaves ``room``
    tokens for the closing text and an answer, and that token."""
    probs = [math.exp(lp.logprob) for lp in out.logprobs]
    i = min(range(lo, len(probs) - room), key=lambda j: probs[j])
    p = probs[i] * 1.0001
    first = _first_below(out, p)
    assert first is not None
    return p, first


@pytest.mark.parametrize("sampled", [False, True])
def test_thinking_closes_in_place_of_the_first_token_below_the_threshold(llm, sampled):
    kw = dict(temperature=0.9, seed=7) if sampled else {}
    ref = llm.generate([OPEN_PROMPT], _params(logprobs=0, **kw))[0]
    p, at = _threshold_firing_at(ref)
    out = llm.generate([OPEN_PROMPT], _params(low_confidence_exit=p, **kw))[0]
    close = llm.engine.close_ids
    r = out.reasoning
    assert r.closed_by == "low_confidence" and r.think_tokens == at and r.phase == "answer"
    assert out.token_ids[:at] == ref.token_ids[:at]  # the same thinking up to the guess
    assert out.token_ids[at:at + len(close)] == close  # then the closing text instead of the guessed token
    assert format_ok("<think>" + out.text) or len(out.token_ids) == 60
    assert out.logprobs is None  # the probabilities were used, not returned


def test_logprobs_of_an_exited_output_are_those_of_its_tokens(llm):
    ref = llm.generate([OPEN_PROMPT], _params(logprobs=2))[0]
    p, at = _threshold_firing_at(ref)
    out = llm.generate([OPEN_PROMPT], _params(logprobs=2, low_confidence_exit=p))[0]
    assert len(out.logprobs) == len(out.token_ids)
    assert [lp.token_id for lp in out.logprobs] == out.token_ids
    assert [(lp.logprob, lp.top) for lp in out.logprobs[:at]] == [(lp.logprob, lp.top) for lp in ref.logprobs[:at]]


def test_a_threshold_below_every_token_changes_nothing(llm):
    ref = llm.generate([OPEN_PROMPT], _params(logprobs=0))[0]
    low = min(math.exp(lp.logprob) for lp in ref.logprobs) * 0.5
    out = llm.generate([OPEN_PROMPT], _params(low_confidence_exit=low))[0]
    assert out.token_ids == ref.token_ids and out.reasoning.closed_by != "low_confidence"


def test_an_output_that_never_thinks_is_left_alone(llm):
    """No <think> in the output: nothing to close (the documented fallback), whatever the threshold."""
    ref = llm.generate([PLAIN_PROMPT], _params())[0]
    out = llm.generate([PLAIN_PROMPT], _params(low_confidence_exit=0.99))[0]
    assert out.reasoning.phase == "none" and out.token_ids == ref.token_ids


def test_batched_low_confidence_exit_matches_single(llm):
    prompts = [OPEN_PROMPT, "x<think>", "Why?\n<think>\n", OPEN_PROMPT + " then", PLAIN_PROMPT]
    thresholds = []
    for prompt in prompts:
        ref = llm.generate([prompt], _params(logprobs=0))[0]
        thresholds.append(_threshold_firing_at(ref, lo=3)[0])
    params = [_params(low_confidence_exit=p, answer_budget=8 if i % 2 else None, jump_forward=i % 3 == 0)
              for i, p in enumerate(thresholds)]
    assert_batched_matches_single(llm, prompts, params, "low_confidence", 3)


def test_speculative_decoding_exits_where_plain_decoding_does(tiny_models):
    """Draft tokens the model keeps are checked like sampled ones: the same exit, the same tokens."""
    plain, spec = plain_and_speculative(tiny_models)
    prompts = [OPEN_PROMPT, "x<think>", "Why?\n<think>\n"]
    for prompt in prompts:
        ref = plain.generate([prompt], _params(max_tokens=120, logprobs=0))[0]
        for lo in (3, 40, 70):
            p, _ = _threshold_firing_at(ref, lo=lo)
            a = plain.generate([prompt], _params(max_tokens=120, low_confidence_exit=p))[0]
            b = spec.generate([prompt], _params(max_tokens=120, low_confidence_exit=p))[0]
            assert b.token_ids == a.token_ids and b.reasoning.closed_by == a.reasoning.closed_by == "low_confidence"
    assert spec.engine.stats["spec_accepted_tokens"] > 0  # drafts were kept (the tiny model loops)


@pytest.mark.parametrize("value", [0, 0.0, 1, 1.0, 1.5, -0.2, True, "0.3"])
def test_bad_thresholds_are_value_errors(value):
    with pytest.raises(ValueError, match="low_confidence_exit"):
        SamplingParams(low_confidence_exit=value)


def test_low_confidence_exit_cannot_be_combined_with_guided_decoding():
    with pytest.raises(ValueError, match="guided decoding"):
        SamplingParams(low_confidence_exit=0.3, guided_choice=["a", "b"])
