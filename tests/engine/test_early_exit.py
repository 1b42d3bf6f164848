"""Confidence early exit: probes at thinking pauses, invisible to users, adopted when confident."""

import math

import pytest

from llmopt import LLM, SamplingParams
from llmopt.reasoning.early_exit import at_transition, exit_now, trial_confidence
from llmopt.reasoning.format import format_ok
from tests.conftest import SMOLLM2, requires_smollm2
from tests.engine.reasoning_util import OPEN_PROMPT, reasoning_params

# byte-level random model: common letters as "pauses" so that probes fork often
MARKERS = ("a", "e", "i", "o", " ", "\n")


def _params(**kw):
    return reasoning_params(48, **(dict(early_exit=True, early_exit_threshold=1e-6, early_exit_min_gap=3,
                                        early_exit_probe_tokens=6, early_exit_markers=MARKERS) | kw))


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(str(tiny_models["llama"][1]), kv_cache_memory_gb=0.05, block_size=8)


@pytest.mark.parametrize("kw", [dict(early_exit_threshold=0.0), dict(early_exit_threshold=1.5),
                                dict(early_exit_threshold=-0.2), dict(early_exit_min_gap=0),
                                dict(early_exit_probe_tokens=1), dict(early_exit_markers=()),
                                dict(early_exit_markers=("",))])
def test_bad_early_exit_settings_are_value_errors(kw):
    with pytest.raises(ValueError, match="early_exit"):
        SamplingParams(early_exit=True, **kw)


def test_trial_confidence_is_the_mean_probability_before_the_closing_tag():
    lps = [math.log(0.5), math.log(0.7), math.log(0.1), math.log(0.2)]
    assert trial_confidence(lps, ["4", "2", "</answer", ">"]) == pytest.approx(0.6)
    assert trial_confidence(lps, ["4", "2", "x", "y"]) is None  # never closed: no exit
    assert trial_confidence(lps[:2], [" ", "</answer>"]) is None  # empty answer: no exit
    assert not exit_now(1.0, 1.0) and exit_now(0.5, 0.4) and not exit_now(None, 0.1)


def test_transitions_are_found_where_a_marker_ends_in_the_new_text():
    assert at_transition("abc\n\n", 1, ("\n\n",))  # the marker straddles two tokens
    assert not at_transition("ab\n\nc", 1, ("\n\n",))
    assert at_transition("so. Wait", 3, ("Wait",)) and not at_transition("Wai", 3, ("Wait",))


def test_probes_never_leak_into_outputs_or_change_a_non_exiting_output(llm):
    eng = llm.engine
    plain = llm.generate([OPEN_PROMPT], _params(early_exit=False))[0]
    seq = eng.add_request(OPEN_PROMPT, _params(), request_id="parent")
    seen = set()
    while not seq.finished:
        seen |= {o.request_id for o in eng.step()}
        assert eng.running_ids() in ([], ["parent"]) and eng.waiting_ids() in ([], ["parent"])
    out = eng.generate([OPEN_PROMPT], _params())[0]
    assert seen == {"parent"}
    assert seq.think.probes > 0 and out.reasoning.probes == seq.think.probes
    # the random model never writes </answer>: every probe is dropped, the output is the plain one
    assert out.token_ids == plain.token_ids and out.reasoning.exit_at is None
    assert 0 < out.reasoning.probe_prefix_hit_rate < 1  # the parent's full blocks, from the prefix cache
    assert eng.block_manager.num_used_blocks == 0


def test_aborting_a_parent_frees_its_probe_blocks(llm):
    eng = llm.engine
    free0 = eng.block_manager.num_free_blocks
    seq = eng.add_request(OPEN_PROMPT, _params(max_tokens=200), request_id="to-abort")
    while seq.think.probe is None or not seq.think.probe.block_table:
        eng.step()
    probe = seq.think.probe
    assert eng.abort("to-abort")
    assert probe.finished and probe.finish_reason == "abort" and not eng.has_unfinished()
    assert eng.block_manager.num_free_blocks == free0


def test_batched_with_probes_matches_single(llm):
    prompts = [OPEN_PROMPT, OPEN_PROMPT + " then", "x<think>", "Why?\n<think>\n"]
    params = [_params(early_exit_min_gap=g) for g in (3, 5, 4, 7)]
    singles = [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    batched = llm.engine.generate(prompts, params)
    assert [o.token_ids for o in batched] == singles


@requires_smollm2
def test_early_exit_fires_on_a_confident_answer_and_never_at_threshold_one():
    llm = LLM(SMOLLM2, num_threads=1)
    msgs = [{"role": "user", "content": "What is 2 + 2? Think, then answer."}]
    ids = llm.tokenizer.apply_chat_template(msgs) + llm.tokenizer.encode("<think>\n", add_special_tokens=False)
    kw = dict(max_tokens=48, temperature=0.0, stop=["</answer>"], include_stop_str_in_output=True,
              early_exit=True, early_exit_min_gap=2, early_exit_probe_tokens=8,
              early_exit_markers=("\n", " ", "."))
    fired, never = llm.engine.generate([ids, ids], [SamplingParams(**kw, early_exit_threshold=1e-6),
                                                    SamplingParams(**kw, early_exit_threshold=1.0)])
    assert fired.reasoning.closed_by == "early_exit" and fired.reasoning.exit_at is not None
    assert format_ok("<think>\n" + fired.text)
    assert never.reasoning.exit_at is None and never.reasoning.probes > 0
    assert never.reasoning.closed_by != "early_exit"
    alone = llm.generate([ids], SamplingParams(**kw, early_exit_threshold=1e-6))[0]
    assert alone.token_ids == fired.token_ids
