"""Confidence-gated think budgets: at the budget the engine tries the answer and cuts only when it is
confident; otherwise thinking goes on up to the hard cap."""

import pytest

from llmopt import LLM, SamplingParams
from llmopt.models.registry import REASONING_MODEL
from llmopt.reasoning.budget import budget_limit
from llmopt.reasoning.format import format_ok
from llmopt.tasks.base import REASONING_SYSTEM_PROMPT
from tests.conftest import requires_smollm2
from tests.engine.reasoning_util import OPEN_PROMPT, PLAIN_PROMPT, reasoning_params


def _params(**kw):
    return reasoning_params(80, **(dict(early_exit_min_gap=5, early_exit_probe_tokens=6) | kw))


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(str(tiny_models["llama"][1]), kv_cache_memory_gb=0.05, block_size=8)


@pytest.mark.parametrize("kw, match", [
    (dict(think_budget=8, think_budget_threshold=0.0), "think_budget_threshold"),
    (dict(think_budget=8, think_budget_threshold=1.5), "think_budget_threshold"),
    (dict(think_budget=8, think_budget_threshold=True), "think_budget_threshold"),
    (dict(think_budget=8, think_budget_threshold="0.9"), "think_budget_threshold"),
    (dict(think_budget_threshold=0.9), "set think_budget too"),
    (dict(think_budget=8, think_budget_max=16), "set think_budget_threshold too"),
    (dict(think_budget=8, think_budget_threshold=0.9, think_budget_max=4), r"think_budget_max \(4\) must be >="),
    (dict(think_budget=8, think_budget_threshold=0.9, think_budget_max=0), "think_budget_max"),
    (dict(think_budget=8, think_budget_threshold=0.9, think_budget_max=2.5), "think_budget_max"),
])
def test_bad_gated_budget_settings_are_value_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_an_unconfident_budget_thinks_on_to_the_cap_with_probes_every_gap(llm):
    plain = llm.generate([OPEN_PROMPT], _params(think_budget=30))[0]
    out = llm.generate([OPEN_PROMPT], _params(think_budget=10, think_budget_threshold=1.0, think_budget_max=30))[0]
    r = out.reasoning
    assert r.closed_by == "budget" and r.think_tokens == 30  # never confident: cut at the cap
    assert r.probes == len(range(10, 30, 5)) and r.exit_at is None  # at 10, 15, 20, 25
    assert out.token_ids == plain.token_ids  # the probes changed nothing: the same as a plain budget at the cap
    assert format_ok("<think>" + out.text)


def test_the_cap_defaults_to_where_the_answer_still_fits(llm):
    out = llm.generate([OPEN_PROMPT], _params(think_budget=10, think_budget_threshold=1.0))[0]
    assert out.reasoning.think_tokens == budget_limit(80, 80, len(llm.engine.close_ids))
    assert format_ok("<think>" + out.text) and len(out.token_ids) <= 80


def test_gated_budget_does_nothing_when_the_output_does_not_open_think(llm):
    plain = llm.generate([PLAIN_PROMPT], _params())[0]
    gated = llm.generate([PLAIN_PROMPT], _params(think_budget=5, think_budget_threshold=0.5))[0]
    assert gated.token_ids == plain.token_ids and gated.reasoning.probes == 0


def test_batched_gated_budgets_match_single(llm):
    prompts = [OPEN_PROMPT, PLAIN_PROMPT, "x<think>", OPEN_PROMPT + " hmm", "Why?\n<think>\n"]
    params = [_params(think_budget=b, think_budget_threshold=1.0, think_budget_max=c, loop_exit=loop)
              for b, c, loop in ((6, 20, False), (7, 30, False), (11, None, False), (4, 40, True), (9, 9, False))]
    singles = [llm.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    batched = llm.engine.generate(prompts, params)
    assert [o.token_ids for o in batched] == [o.token_ids for o in singles]
    assert [o.reasoning.probes for o in batched] == [o.reasoning.probes for o in singles]
    assert llm.engine.block_manager.num_used_blocks == 0


@requires_smollm2
def test_a_confident_trial_answer_cuts_at_the_budget_and_is_adopted():
    llm = LLM(REASONING_MODEL, kv_cache_memory_gb=0.25, num_threads=1)
    msgs = [{"role": "system", "content": REASONING_SYSTEM_PROMPT}, {"role": "user", "content": "What is 17 * 24?"}]
    ids = llm.tokenizer.apply_chat_template(msgs)
    kw = dict(max_tokens=96, temperature=0.0, stop=["</answer>"], include_stop_str_in_output=True,
              early_exit_probe_tokens=16, think_budget=6)
    fixed, cut, kept = llm.engine.generate([ids, ids, ids], [
        SamplingParams(**kw), SamplingParams(**kw, think_budget_threshold=1e-6),
        SamplingParams(**kw, think_budget_threshold=1.0, think_budget_max=12)])
    assert cut.reasoning.closed_by == "budget_probe" and cut.reasoning.think_tokens == 6
    assert cut.reasoning.probes == 1 and cut.reasoning.exit_at == 6
    assert cut.token_ids == fixed.token_ids  # the adopted trial answer is the greedy answer after the cut
    assert format_ok(cut.text)
    assert kept.reasoning.closed_by in ("budget", "model") and kept.reasoning.think_tokens > 6
    assert kept.reasoning.probes >= 1 and format_ok(kept.text)
    alone = llm.generate([ids], SamplingParams(**kw, think_budget_threshold=1e-6))[0]
    assert alone.token_ids == cut.token_ids
