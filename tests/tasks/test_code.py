"""HumanEval grading in the sandbox: canonical solutions pass, wrong ones fail."""

import pytest

from llmopt.reasoning.format import extract_answer
from llmopt.tasks.code import (
    HumanEvalSuite,
    build_program,
    extract_code,
    grade_code,
    load_problems,
    problem_ids,
)
from llmopt.tasks.sandbox import SandboxLimits

LIMITS = SandboxLimits(timeout_s=10.0)
# A spread of problems, including ones whose prompt defines helper functions (10, 38, 50).
SAMPLE = ["HumanEval/0", "HumanEval/10", "HumanEval/32", "HumanEval/38", "HumanEval/50",
          "HumanEval/83", "HumanEval/129", "HumanEval/163"]


def _answer(code: str) -> str:
    return f"<think>\nI implement the docstring.\n</think>\n<answer>\n{code}\n</answer>"


def test_humaneval_ships_all_164_problems():
    assert len(load_problems()) == 164
    assert problem_ids()[:2] == ["HumanEval/0", "HumanEval/1"]


@pytest.mark.parametrize("task_id", SAMPLE)
def test_canonical_solution_as_full_function_passes(task_id):
    p = load_problems()[task_id]
    full = p["prompt"] + p["canonical_solution"]
    g = grade_code(p, extract_answer(_answer(full)), LIMITS)
    assert g.correct, g.detail


def test_canonical_solutions_in_body_and_fenced_forms_pass():
    for task_id in SAMPLE[:3]:
        p = load_problems()[task_id]
        assert grade_code(p, p["canonical_solution"], LIMITS).correct  # completion (body) form
        fenced = f"Here you go:\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone."
        assert grade_code(p, extract_answer(_answer(fenced)), LIMITS).correct


@pytest.mark.parametrize(
    "task_id, wrong",
    [
        ("HumanEval/0", "def has_close_elements(numbers, threshold):\n    return False\n"),
        ("HumanEval/2", "def truncate_number(number: float) -> float:\n    return int(number)\n"),
        ("HumanEval/0", "def has_close_elements(numbers, threshold)\n    return True\n"),  # syntax
        ("HumanEval/0", "def some_other_name(numbers, threshold):\n    return True\n"),
        ("HumanEval/7", "    return strings\n"),  # body that ignores the filter
        ("HumanEval/0", "import sys\nsys.exit(0)\n"),  # exits "successfully" before the tests
    ],
)
def test_wrong_solutions_fail(task_id, wrong):
    p = load_problems()[task_id]
    g = grade_code(p, wrong, LIMITS)
    assert not g.correct, g.detail


def test_exit_zero_before_the_tests_is_not_a_pass():
    p = load_problems()["HumanEval/0"]
    hack = "import sys\nsys.exit(0)\n"  # module level, after the stub: runs before check()
    program = build_program(p, hack, "TOKEN")
    assert program.index("sys.exit(0)") < program.index("check(has_close_elements)")
    g = grade_code(p, hack, LIMITS)
    assert not g.correct and g.detail == "exited before the tests finished"


def test_a_solution_of_another_problem_fails():
    p, other = load_problems()["HumanEval/0"], load_problems()["HumanEval/1"]
    assert not grade_code(p, other["prompt"] + other["canonical_solution"], LIMITS).correct


def test_hanging_solution_fails_as_timeout():
    p = load_problems()["HumanEval/0"]
    g = grade_code(p, "def has_close_elements(numbers, threshold):\n    while True:\n        pass\n",
                   SandboxLimits(timeout_s=1.0))
    assert not g.correct and g.detail.startswith("timeout")


def test_missing_answer_is_wrong():
    assert not grade_code(load_problems()["HumanEval/0"], None, LIMITS).correct


def test_extract_code_prefers_the_block_defining_the_entry_point():
    answer = "```python\nprint('example')\n```\n```python\ndef f(x):\n    return x\n```"
    assert extract_code(answer, "f") == "def f(x):\n    return x\n"
    assert extract_code(answer) == "print('example')\n"
    assert extract_code("def f(x):\n    return x") == "def f(x):\n    return x"


def test_items_are_a_seeded_sample_with_the_prompt_in_the_question():
    suite = HumanEvalSuite(LIMITS)
    a, b = suite.items(5, seed=1), suite.items(5, seed=1)
    assert [i.id for i in a] == [i.id for i in b]
    assert [i.id for i in a] != [i.id for i in suite.items(5, seed=2)]
    for it in a:
        assert load_problems()[it.id]["prompt"] in it.messages[-1]["content"]
    demo_items = suite.items(5, seed=1, shots=2)
    demo_ids = {m["content"] for m in demo_items[0].messages if m["role"] == "user"}
    assert len(demo_ids) == 3  # two demos + the question, all different


def test_grade_through_the_suite_uses_the_payload():
    suite = HumanEvalSuite(LIMITS)
    it = suite.items(1, seed=0)[0]
    assert suite.grade(it, it.reference).correct
    assert not suite.grade(it, "pass").correct
