"""Pure parts of llmopt.reasoning.budget: where an answer is closed, and the think gate's count."""

import math

import pytest

from llmopt.reasoning.budget import Phase, ThinkTracker, answer_limit


@pytest.mark.parametrize("by", ["budget", "loop", "low_confidence", "think_gate", "early_exit", "eos"])
def test_the_answer_budget_caps_answers_after_an_engine_close(by):
    t = ThinkTracker(opened_in_prompt=True)
    t.close(30, by)
    assert answer_limit(t, 200, 24) == 54
    assert answer_limit(t, 40, 24) == 40  # max_tokens first
    assert answer_limit(t, 200, None) == 200


def test_an_answer_after_the_models_own_close_runs_to_max_tokens():
    """The model's finished answer (e.g. code, longer than the cut-off answers the budget is for) is not cut."""
    t = ThinkTracker(opened_in_prompt=True)
    t.update("some thought</think>\n<answer>", 12)
    assert t.closed_by == "model" and t.phase == Phase.ANSWER
    assert answer_limit(t, 200, 24) == 200


def test_the_gate_counts_think_tokens_only_and_looks_once():
    t = ThinkTracker()  # <think> not yet written: tokens do not count
    assert not t.gate_fails(math.log(0.01), 3, 0.9)
    t.update("<think>", 1)
    assert t.phase == Phase.THINKING
    assert [t.gate_fails(math.log(p), 3, 0.9) for p in (0.95, 0.99)] == [False, False]
    assert t.gate_fails(math.log(0.5), 3, 0.9)  # (0.95 * 0.99 * 0.5) ** (1/3) = 0.78 < 0.9
    assert not t.gate_fails(math.log(0.01), 3, 0.9)  # one look: later tokens do not count
    u = ThinkTracker(opened_in_prompt=True)
    assert [u.gate_fails(math.log(0.95), 3, 0.9) for _ in range(4)] == [False] * 4  # sure: passes
    assert u.gate_open(3) is False and ThinkTracker(opened_in_prompt=True).gate_open(3) is True
    assert not ThinkTracker(opened_in_prompt=True).gate_open(None)
