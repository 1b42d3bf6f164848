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


# ---- any reasoning-gym task: rg:TASK suites ---------------------------------------------------

def test_any_reasoning_gym_task_is_a_suite_and_unknown_names_say_where_to_look():
    from llmopt.tasks.mathlogic import reasoning_gym_suite, suite_tasks

    assert suite_tasks("rg:gcd+lcm") == ("gcd", "lcm")
    items = reasoning_gym_suite("rg:gcd+lcm").items(4, seed=3)
    assert [it.task for it in items] == ["gcd", "lcm", "gcd", "lcm"] and items[0].suite == "rg:gcd+lcm"
    with pytest.raises(ValueError, match="unknown reasoning-gym task.*'no_such_task'.*reasoning-gym has: .*gcd"):
        suite_tasks("rg:gcd+no_such_task")
    with pytest.raises(ValueError, match="names no task"):
        suite_tasks("rg:")


def test_a_task_outside_the_suites_is_graded_by_its_gold_answers_form():
    from llmopt.tasks.mathlogic import reasoning_gym_suite

    gcd = reasoning_gym_suite("rg:gcd").items(1, seed=3)[0]  # numeric gold: one final value
    gold = gcd.reference
    assert _grade(gcd, gold).correct and _grade(gcd, f"x = {gold}").correct
    assert not _grade(gcd, f"{gold} or {int(gold) + 1}").correct  # a hedge, though the verifier may take it
    assert not _grade(gcd, f"{gold}, {int(gold) * 2}").correct
    assert not _grade(gcd, str(int(gold) + 1)).correct
    cd = reasoning_gym_suite("rg:countdown").items(1, seed=3)[0]  # an expression: the task's verifier
    assert _grade(cd, cd.reference).correct
    assert not _grade(cd, "1 + 1").correct and not _grade(cd, "").correct


def test_eval_config_takes_rg_suites_and_refuses_unknown_tasks():
    from llmopt.tasks.evaluate import EvalConfig, build_items

    cfg = EvalConfig(model="x", suites=("rg:gcd", "math"), n=2, seed=1)
    items = build_items(cfg)
    assert [it.task for it in items["rg:gcd"]] == ["gcd", "gcd"] and len(items["math"]) == 2
    with pytest.raises(ValueError, match="unknown reasoning-gym task"):
        EvalConfig(model="x", suites=("rg:nope",))
    with pytest.raises(ValueError, match=r"rg:TASK \(any reasoning-gym task"):
        EvalConfig(model="x", suites=("maths",))


def test_training_takes_rg_suites_on_training_seeds():
    from llmopt.train.data import DatasetError, build_examples

    ex = build_examples({"rg:gcd": 3})
    assert len(ex) == 3 and all(e.task == "gcd" and e.id.startswith("train/rg:gcd/gcd/1000000000/") for e in ex)
    assert all(e.grade(e.answer).correct for e in ex)
    with pytest.raises(DatasetError, match="unknown reasoning-gym task"):
        build_examples({"rg:nope": 2})


def test_a_prose_answer_of_a_task_outside_the_suites_may_use_the_words_its_gold_uses():
    from llmopt.tasks.mathlogic import grade_reasoning_gym

    class Lenient:  # a verifier that takes any answer containing the gold text
        @staticmethod
        def score_answer(answer, entry):
            return 1.0 if entry["answer"] in answer else 0.0

    entry = {"answer": "slow but steady wins the race"}
    assert grade_reasoning_gym("some_new_task", Lenient, entry, "slow but steady wins the race").correct
    assert not grade_reasoning_gym("some_new_task", Lenient, {"answer": "red"}, "red or blue").correct  # a hedge
    # inside the suites the hedge rule stays strict (a logic answer never needs "maybe")
    assert not grade_reasoning_gym("knights_knaves", Lenient, {"answer": "maybe"}, "maybe").correct


def test_a_yes_no_task_outside_the_suites_takes_exactly_yes_or_no():
    from llmopt.tasks.mathlogic import grade_reasoning_gym

    class Lenient:  # a verifier that takes any answer containing the gold word
        @staticmethod
        def score_answer(answer, entry):
            return 1.0 if entry["answer"].lower() in answer.lower() else 0.0

    entry = {"answer": "Yes"}
    assert grade_reasoning_gym("some_new_task", Lenient, entry, "yes.").correct
    assert not grade_reasoning_gym("some_new_task", Lenient, entry, "yes, and no").correct
    assert not grade_reasoning_gym("some_new_task", Lenient, entry, "No").correct
