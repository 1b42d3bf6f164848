"""The graders are the training reward: answers that are not one final value must fail.

Rejections are tested as carefully as acceptances, on real reasoning-gym items.
"""

import pytest

from llmopt.tasks.code import HumanEvalSuite
from llmopt.tasks.mathlogic import grade_reasoning_gym, logic_suite, math_suite, single_value


def _item(suite, task: str, seed: int = 5):
    for it in suite.items(24, seed=seed):
        if it.task == task:
            return it
    raise AssertionError(task)


def _grade(item, answer):
    ds, entry = item.payload
    return grade_reasoning_gym(item.task, ds, entry, answer)


def test_a_restated_expression_is_not_an_answer():
    it = _item(math_suite(), "basic_arithmetic")
    ds, entry = it.payload
    expr = entry["metadata"]["expression"]
    assert _grade(it, entry["answer"]).correct
    assert not _grade(it, expr).correct, expr  # the question's own expression
    assert not _grade(it, f"{expr} = {entry['answer']}").correct
    assert single_value("-425 * 236 / 2") is None


@pytest.mark.parametrize("template", [
    "{g} or {w}", "{w} or {g}", "maybe {g} but {w}", "{g}, {w}", "{g} and {w}", "either {g} or {w}",
    "about {g}", "{g}?", "{g} {w}",
])
def test_hedges_and_several_candidates_are_wrong(template):
    for task in ("chain_sum", "leg_counting", "simple_equations"):
        it = _item(math_suite(), task)
        g = str(it.payload[1]["answer"])
        w = str(int(g) + 1)
        ans = template.format(g=g, w=w)
        assert not _grade(it, ans).correct, (task, ans)


@pytest.mark.parametrize("answer", ["", "   ", "\n"])
def test_empty_answers_are_wrong(answer):
    for suite in (math_suite(), logic_suite()):
        for it in suite.items(len(suite.tasks), seed=5):
            assert not _grade(it, answer).correct, it.task


@pytest.mark.parametrize("template", [
    "{g}", "{g}.0", "x = {g}", "\\boxed{{{g}}}", "${g}$", "The answer is {g}.", "{g} legs", "**{g}**",
])
def test_equivalent_forms_of_the_one_value_are_right(template):
    for task in ("chain_sum", "leg_counting", "basic_arithmetic"):
        it = _item(math_suite(), task)
        g = str(it.payload[1]["answer"])
        ans = template.format(g=g)
        assert _grade(it, ans).correct, (task, ans)


def test_fractions_in_lowest_terms_are_values_and_others_are_expressions():
    assert single_value("3/4") == "3/4"
    assert single_value("\\frac{3}{4}") == "3/4"
    assert single_value("-\\frac{1}{2}") == "-1/2"
    assert single_value("100/4") is None  # restates 25
    assert single_value("1,000") == "1000"
    assert single_value("6, 500") is None


def test_numeric_equality_is_exact_not_approximate():
    it = _item(math_suite(), "chain_sum")
    g = int(it.payload[1]["answer"])
    assert not _grade(it, f"{g}.001").correct
    assert not _grade(it, str(-g) if g else "1").correct


def test_syllogism_takes_exactly_yes_or_no():
    it = _item(logic_suite(), "syllogism")
    gold = it.payload[1]["answer"]
    assert _grade(it, gold).correct
    assert _grade(it, gold.lower() + ".").correct
    for bad in ("Yes or No", "No or Yes", f"{gold}, probably", f"{gold} and no", "Yes/No", "maybe"):
        assert not _grade(it, bad).correct, bad


def test_logic_hedges_are_wrong_even_when_the_gold_is_inside():
    for task in ("zebra_puzzles", "knights_knaves", "aiw", "self_reference"):
        it = _item(logic_suite(), task)
        gold = str(it.payload[1]["answer"])
        assert _grade(it, gold).correct, task
        assert not _grade(it, f"{gold} or something else").correct, task
        assert not _grade(it, f"perhaps {gold}").correct, task


def test_code_answer_that_is_empty_fails_and_the_sandbox_check_still_runs():
    suite = HumanEvalSuite()
    it = suite.items(1, seed=0)[0]
    assert suite.grade(it, "", "").detail == "empty answer"
    assert suite.grade(it, "```python\n```", "").detail == "empty answer"
    assert suite.grade(it, it.reference, "").correct
    assert not suite.grade(it, f"def {it.payload['entry_point']}(*a, **k):\n    return None\n", "").correct
