"""Thinking budgets: the engine closes <think> itself at the budget and the output keeps the format."""

import pytest

from llmopt import LLM, SamplingParams
from llmopt.reasoning.budget import CLOSE_TEXT, Phase, ThinkTracker, budget_limit
from llmopt.reasoning.format import format_ok
from tests.engine.reasoning_util import OPEN_PROMPT, PLAIN_PROMPT, reasoning_params


def _params(**kw):
    return reasoning_params(60, **kw)


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(str(tiny_models["llama"][1]), kv_cache_memory_gb=0.05, block_size=8)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "10"])
def test_bad_think_budget_is_a_value_error(bad):
    with pytest.raises(ValueError, match="think_budget"):
        SamplingParams(think_budget=bad)


def test_budget_closes_thinking_once_and_output_matches_the_rule(llm):
    close = llm.engine.close_ids
    out = llm.generate([OPEN_PROMPT], _params(think_budget=12))[0]
    r = out.reasoning
    assert r.closed_by == "budget" and r.think_tokens == 12 and r.phase == "answer"
    assert out.token_ids[12:12 + len(close)] == close  # forced right at the budget
    assert out.text.count(CLOSE_TEXT) == 1
    assert format_ok("<think>" + out.text)  # the caller's forced <think> + the output
    assert r.think_tokens + r.answer_tokens == len(out.token_ids)


def test_forced_closing_text_is_computed_in_one_step_as_a_chunk(llm):
    eng = llm.engine
    seq = eng.add_request(OPEN_PROMPT, _params(think_budget=5))
    while seq.think.closed_by is None:
        eng.step()
    assert seq.num_to_compute == len(eng.close_ids) + 1  # the last sampled token + the closing text
    before = seq.num_computed_tokens
    eng.step()
    assert seq.num_computed_tokens == before + len(eng.close_ids) + 1  # all of it in the next step
    eng.abort(seq.request_id)


def test_answer_is_closed_before_max_tokens_cuts_it(llm):
    out = llm.generate([OPEN_PROMPT], _params(think_budget=4, max_tokens=50))[0]
    assert len(out.token_ids) <= 50
    assert out.text.endswith("</answer>") and format_ok("<think>" + out.text)


@pytest.mark.parametrize("bad", [0, -1, 2.5, False, "8"])
def test_bad_answer_budget_is_a_value_error(bad):
    with pytest.raises(ValueError, match="answer_budget"):
        SamplingParams(answer_budget=bad)


def test_answer_budget_closes_the_answer_that_many_tokens_after_thinking(llm):
    close, answer_close = llm.engine.close_ids, llm.engine.answer_close_ids
    budget = len(close) + 5 + len(answer_close)  # the engine's closing text, 5 model tokens, </answer>
    free = llm.generate([OPEN_PROMPT], _params(think_budget=6, max_tokens=80))[0]
    out = llm.generate([OPEN_PROMPT], _params(think_budget=6, answer_budget=budget, max_tokens=80))[0]
    r = out.reasoning
    assert len(free.token_ids) == 80  # the random model never closes its answer: max_tokens does
    assert r.think_tokens == 6 and r.answer_tokens == budget and len(out.token_ids) == 6 + budget
    assert out.token_ids[-len(answer_close):] == answer_close and out.finish_reason == "stop"
    assert out.token_ids[:-len(answer_close)] == free.token_ids[:6 + len(close) + 5]  # same text up to the cut
    assert format_ok("<think>" + out.text)


def test_answer_budget_alone_caps_a_model_written_answer(llm):
    # no think budget: the model runs into max_tokens' reserve, then the answer budget counts from there
    budget = len(llm.engine.close_ids) + 3 + len(llm.engine.answer_close_ids)
    out = llm.generate([OPEN_PROMPT], _params(answer_budget=budget, max_tokens=200, loop_exit=True))[0]
    r = out.reasoning
    assert r.answer_tokens == budget and out.text.endswith("</answer>") and format_ok("<think>" + out.text)


def test_answer_budgets_batch_like_single(llm):
    prompts = [OPEN_PROMPT, "x<think>", OPEN_PROMPT + " hmm"]
    extra = len(llm.engine.close_ids) + len(llm.engine.answer_close_ids)
    params = [_params(think_budget=b, answer_budget=extra + a, max_tokens=90) for b, a in ((3, 1), (9, 7), (5, 4))]
    singles = [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    assert [o.token_ids for o in llm.engine.generate(prompts, params)] == singles
    assert llm.engine.block_manager.num_used_blocks == 0


def test_budget_is_lowered_to_leave_room_for_the_answer(llm):
    out = llm.generate([OPEN_PROMPT], _params(think_budget=1000, max_tokens=60))[0]
    limit = budget_limit(1000, 60, len(llm.engine.close_ids))
    assert out.reasoning.think_tokens == limit < 60
    assert format_ok("<think>" + out.text)


def test_budget_does_nothing_when_the_output_does_not_open_think(llm):
    plain = llm.generate([PLAIN_PROMPT], _params())[0]
    budgeted = llm.generate([PLAIN_PROMPT], _params(think_budget=5))[0]
    assert budgeted.token_ids == plain.token_ids
    assert budgeted.reasoning.phase == "none" and budgeted.reasoning.closed_by is None


def test_budgeted_batch_matches_single(llm):
    prompts = [OPEN_PROMPT, PLAIN_PROMPT, "x<think>", OPEN_PROMPT + " hmm"]
    params = [_params(think_budget=b) for b in (3, 7, 11, 20)]
    singles = [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    batched = llm.engine.generate(prompts, params)
    assert [o.token_ids for o in batched] == singles
    assert llm.engine.block_manager.num_used_blocks == 0


def test_tracker_follows_a_model_written_format():
    t = ThinkTracker()
    for n, text in enumerate(["<th", "<think>", "<think>a", "<think>a</thi", "<think>a</think>", "<think>a</think><answer>1</answer>"], 1):
        t.update(text, n)
    assert t.phase == Phase.ANSWER and t.closed_by == "model" and t.think_tokens == 5 and t.answer_closed
    t = ThinkTracker()
    t.update(" <think>", 1)
    assert t.phase == Phase.NONE  # the rule needs <think> first: budgets do nothing
    assert ThinkTracker(opened_in_prompt=True).phase == Phase.THINKING
