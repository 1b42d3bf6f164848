"""Loop exit: the engine closes a think part that repeats itself; nothing else about the output changes."""

import pytest

from llmopt import LLM, SamplingParams
from llmopt.reasoning.budget import budget_limit
from llmopt.reasoning.format import format_ok
from llmopt.reasoning.loops import DEFAULT_NGRAM, DEFAULT_REPEATS, LoopExitConfig, find_loop
from tests.engine.reasoning_util import OPEN_PROMPT, PLAIN_PROMPT, reasoning_params


def _params(**kw):
    return reasoning_params(200, **kw)


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(str(tiny_models["llama"][1]), kv_cache_memory_gb=0.05, block_size=8)


def test_loop_exit_closes_a_repeating_think_part_where_the_detector_fires(llm):
    close = llm.engine.close_ids
    plain = llm.generate([OPEN_PROMPT], _params())[0]
    at = find_loop(list(plain.token_ids), LoopExitConfig())
    assert at is not None and at < budget_limit(200, 200, len(close))  # the model loops, early enough
    out = llm.generate([OPEN_PROMPT], _params(loop_exit=True))[0]
    r = out.reasoning
    assert r.closed_by == "loop" and r.think_tokens == at and r.phase == "answer"
    assert out.token_ids[:at] == plain.token_ids[:at]  # the same thinking up to the loop
    assert out.token_ids[at:at + len(close)] == close  # then the closing text, right there
    assert format_ok("<think>" + out.text) and len(out.token_ids) <= 200


@pytest.mark.parametrize("prompt, budget, loop", [(OPEN_PROMPT, 20, {}), ("x<think>", 20, {}), (PLAIN_PROMPT, None, {}),
                                                (OPEN_PROMPT, 100, dict(loop_exit_ngram=16, loop_exit_repeats=3))])
def test_greedy_output_is_unchanged_when_no_loop_occurs(llm, prompt, budget, loop):
    off = llm.generate([prompt], _params(think_budget=budget))[0]
    cfg = LoopExitConfig(loop.get("loop_exit_ngram", DEFAULT_NGRAM), loop.get("loop_exit_repeats", DEFAULT_REPEATS))
    assert find_loop(list(off.token_ids[:off.reasoning.think_tokens]), cfg) is None  # no loop in the think part
    on = llm.generate([prompt], _params(think_budget=budget, loop_exit=True, **loop))[0]
    assert on.token_ids == off.token_ids and on.text == off.text
    assert on.reasoning.closed_by == off.reasoning.closed_by != "loop"


def test_loop_exit_alone_still_closes_thinking_where_the_answer_fits(llm):
    out = llm.generate([OPEN_PROMPT], _params(max_tokens=80, loop_exit=True, loop_exit_ngram=64))[0]
    assert out.reasoning.closed_by == "budget"  # no loop seen in 80 tokens with a 64-token window
    assert out.reasoning.think_tokens == budget_limit(80, 80, len(llm.engine.close_ids))
    assert format_ok("<think>" + out.text) and len(out.token_ids) <= 80


def test_batched_loop_exit_matches_single(llm):
    prompts = [OPEN_PROMPT, "x<think>", "Why?\n<think>\n", OPEN_PROMPT + " then", PLAIN_PROMPT]
    params = [_params(loop_exit=True, loop_exit_ngram=k, loop_exit_repeats=r)
              for k, r in ((12, 3), (8, 3), (12, 2), (4, 2), (12, 3))]
    singles = [llm.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    batched = llm.engine.generate(prompts, params)
    assert [o.token_ids for o in batched] == [o.token_ids for o in singles]
    assert sum(o.reasoning.closed_by == "loop" for o in batched) >= 3
    assert llm.engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("kw", [dict(loop_exit="yes"), dict(loop_exit=1), dict(loop_exit=True, loop_exit_ngram=1),
                                dict(loop_exit=True, loop_exit_ngram=1000), dict(loop_exit=True, loop_exit_repeats=0),
                                dict(loop_exit=True, loop_exit_repeats=2.5)])
def test_bad_loop_exit_settings_are_value_errors(kw):
    with pytest.raises(ValueError, match="loop_exit"):
        SamplingParams(**kw)


def test_loop_exit_cannot_be_combined_with_guided_decoding():
    with pytest.raises(ValueError, match="guided decoding"):
        SamplingParams(loop_exit=True, guided_choice=["a", "b"])
