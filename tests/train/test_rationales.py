"""Worked rationales of the gold training targets: every step is right and the last one is the
gold answer; anything that cannot be written exactly falls back (None)."""

from __future__ import annotations

import re

import pytest

from llmopt.train import rationales
from llmopt.train.data import reasoning_gym_examples


def _check_steps(text: str) -> None:
    """Every ``a op b = c`` in the text is true."""
    for a, op, b, c in re.findall(r"(-?\d+) ([-+*/x]) (-?\d+)(?: legs)? = (-?\d+)", text):
        a_, b_, c_ = int(a), int(b), int(c)
        want = {"+": a_ + b_, "-": a_ - b_, "*": a_ * b_, "x": a_ * b_, "/": a_ / b_ if b_ else None}[op]
        assert want == c_, f"wrong step {a} {op} {b} = {c} in {text!r}"


def test_arithmetic_steps_follow_evaluation_order_and_end_in_the_answer() -> None:
    text = rationales.arithmetic_steps("3 + 4 * 5 - ( 6 - 10 )", "27")
    assert text == "4 * 5 = 20, 3 + 20 = 23, 6 - 10 = -4, 23 - -4 = 27."
    _check_steps(text)


def test_arithmetic_steps_refuse_a_wrong_gold_answer_or_a_fraction() -> None:
    assert rationales.arithmetic_steps("3 + 4", "8") is None
    assert rationales.arithmetic_steps("7 / 2 * 2", "7") is None  # 3.5 is not a step we write
    assert rationales.arithmetic_steps("3 +", "3") is None
    assert rationales.arithmetic_steps("2 ** 3", "8") is None  # only + - * /


def test_leg_steps_use_the_table_and_a_running_total() -> None:
    text = rationales.leg_steps({"dog": 2, "spider": 1, "snake": 3}, {"dog": 4, "spider": 8, "snake": 0}, "16")
    assert text is not None and text.endswith("8 + 8 = 16, 16 + 0 = 16.")
    _check_steps(text)
    assert rationales.leg_steps({"dog": 2}, {"dog": 4}, "9") is None
    assert rationales.leg_steps({"unicorn": 2}, {"dog": 4}, "8") is None


def test_equation_steps_collect_then_divide() -> None:
    assert rationales.equation_steps("84*t + 4370 = 9410", "t", "60") == \
        "84*t + 4370 = 9410 gives 84*t = 5040, so t = 5040 / 84 = 60."
    assert rationales.equation_steps("9016 - 3360*q = -108584", "q", "35") == \
        "9016 - 3360*q = -108584 gives -3360*q = -117600, so q = -117600 / -3360 = 35."
    assert rationales.equation_steps("x*x = 4", "x", "2") is None  # not linear
    assert rationales.equation_steps("3*x = 4", "x", "1") is None  # not an integer solution


def test_alice_questions_count_the_woman_herself() -> None:
    q = "Susan has 2 brothers and she also has 6 sisters. How many sisters does Susan's brother have?"
    assert rationales.count_plus_self_steps("7", q) == "Susan's 6 sisters plus Susan herself: 6 + 1 = 7."
    assert rationales.count_plus_self_steps("seven", q) is None


@pytest.mark.parametrize("suite", ["math", "logic"])
def test_generated_targets_with_worked_steps_are_right(suite: str) -> None:
    examples = reasoning_gym_examples(suite, 60, chunk=0)
    worked = 0
    for ex in examples:
        if ex.task in ("basic_arithmetic", "chain_sum", "leg_counting", "simple_equations", "aiw"):
            _check_steps(ex.rationale)
            worked += bool(re.search(r"= -?\d+\.$", ex.rationale))
        assert ex.grade(ex.answer).correct, f"{ex.task}: the gold answer does not grade as correct"
    assert worked >= (24 if suite == "math" else 8)


def test_cosine_schedule_warms_up_then_decays_to_the_floor() -> None:
    from llmopt.train.sft import SFTConfig, lr_at_step

    cfg = SFTConfig(lr=1e-3, lr_schedule="cosine", lr_min_ratio=0.1, warmup_steps=2)
    lrs = [lr_at_step(cfg, s, 10) for s in range(10)]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3) and lrs[2] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[-1] == pytest.approx(1e-4)
    const = SFTConfig(lr=1e-3, warmup_steps=0)
    assert {lr_at_step(const, s, 10) for s in range(10)} == {1e-3}
    with pytest.raises(ValueError, match="lr schedule"):
        SFTConfig(lr_schedule="linear").validate()
