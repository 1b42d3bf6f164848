"""The ``math`` and ``logic`` suites: procedural tasks from reasoning-gym, graded offline.

Task types (each with reasoning-gym's default difficulty configuration):

| suite | task | kind |
|---|---|---|
| math | basic_arithmetic | arithmetic expression with + - * / and brackets |
| math | chain_sum | chain of additions and subtractions |
| math | gsm_symbolic | GSM8K-style word problem with fresh numbers |
| math | leg_counting | word problem: count the legs of listed animals |
| math | simple_equations | algebra: solve a linear equation for one variable |
| logic | syllogism | does a conclusion follow from two premises (Yes/No) |
| logic | aiw | "Alice in Wonderland" family-relation puzzle |
| logic | knights_knaves | who tells the truth on the island of knights and knaves |
| logic | zebra_puzzles | small Einstein puzzle with houses and attributes |
| logic | self_reference | how many truth assignments make self-referential statements consistent |
| logic | propositional_logic | infer a valid conclusion from propositional premises |

Items are taken round-robin over the task types: item ``k`` of a suite is item ``k // T`` of
task type ``k % T``; task type ``t`` is generated with seed ``seed * 1000 + t``, so the same
``(n, seed)`` always gives the same questions.

Grading: an answer is correct when the task's own verifier (``score_answer``) gives it full
marks, or, for tasks with a numeric answer, when ``math-verify`` finds it equal to the gold
answer (so ``-4.0`` and ``x = -4`` count for ``-4``). ``score`` is the verifier's own score,
which gives partial credit on some tasks.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from typing import Any

from .base import REASONING_SYSTEM_PROMPT, Grade, Item, chat_prompt, demo_reply, interleave

log = logging.getLogger(__name__)

MATH_TASKS: tuple[str, ...] = (
    "basic_arithmetic",
    "chain_sum",
    "gsm_symbolic",
    "leg_counting",
    "simple_equations",
)
LOGIC_TASKS: tuple[str, ...] = (
    "syllogism",
    "aiw",
    "knights_knaves",
    "zebra_puzzles",
    "self_reference",
    "propositional_logic",
)
# Tasks whose gold answer is a single number, where math-verify equivalence is also accepted.
NUMERIC_TASKS: frozenset[str] = frozenset(
    {"basic_arithmetic", "chain_sum", "gsm_symbolic", "leg_counting", "simple_equations",
     "aiw", "self_reference"}
)
DEMO_SEED_OFFSET = 7_919  # few-shot demos come from a disjoint seed


@lru_cache(maxsize=256)
def _dataset(task: str, seed: int, size: int) -> Any:
    import reasoning_gym

    return reasoning_gym.create_dataset(task, seed=seed, size=size)


def math_verify_equal(gold: str, answer: str) -> bool:
    """True when math-verify parses both and finds them equal; False on any parse failure."""
    from math_verify import parse, verify

    try:
        g, a = parse(gold), parse(answer)
        return bool(g) and bool(a) and bool(verify(g, a))
    except Exception:  # math-verify raises on odd input and times out on huge expressions
        log.debug("math-verify failed on %r vs %r", gold, answer, exc_info=True)
        return False


class ReasoningGymSuite:
    """A suite of reasoning-gym task types; see the module docstring."""

    def __init__(self, name: str, tasks: tuple[str, ...]):
        self.name = name
        self.tasks = tasks

    def _entries(self, t: int, seed: int, count: int) -> list[tuple[Any, dict, int]]:
        ds_seed = seed * 1000 + t
        ds = _dataset(self.tasks[t], ds_seed, max(count, 1))
        return [(ds, ds[i], i) for i in range(count)]

    def items(self, n: int, seed: int, shots: int = 0) -> list[Item]:
        per_task = math.ceil(n / len(self.tasks)) if n > 0 else 0
        groups = []
        for t, task in enumerate(self.tasks):
            demos = []
            if shots:
                for _, entry, _ in self._entries(t, seed + DEMO_SEED_OFFSET, shots):
                    demos.append(
                        (entry["question"], demo_reply(
                            "I work through the problem step by step and check the result.",
                            str(entry["answer"]),
                        ))
                    )
            group = []
            for ds, entry, i in self._entries(t, seed, per_task):
                group.append(
                    Item(
                        suite=self.name,
                        id=f"{self.name}/{task}/{seed * 1000 + t}/{i}",
                        task=task,
                        messages=chat_prompt(REASONING_SYSTEM_PROMPT, entry["question"], demos),
                        reference=str(entry["answer"]),
                        payload=(ds, entry),
                    )
                )
            groups.append(group)
        return interleave(groups, n)

    def grade(self, item: Item, answer: str | None, output: str = "") -> Grade:
        return grade_reasoning_gym(item.task, item.payload[0], item.payload[1], answer)


def grade_reasoning_gym(task: str, dataset: Any, entry: dict, answer: str | None) -> Grade:
    """Grade one answer with the task's verifier, and math-verify for numeric tasks."""
    if answer is None:
        return Grade(False, 0.0, "no answer")
    score = float(dataset.score_answer(answer, entry))
    if score >= 1.0:
        return Grade(True, 1.0, "verifier")
    if task in NUMERIC_TASKS and entry.get("answer") is not None:
        if math_verify_equal(str(entry["answer"]), answer):
            return Grade(True, 1.0, "math-verify")
    return Grade(False, score, f"verifier score {score:.2f}")


def math_suite() -> ReasoningGymSuite:
    return ReasoningGymSuite("math", MATH_TASKS)


def logic_suite() -> ReasoningGymSuite:
    return ReasoningGymSuite("logic", LOGIC_TASKS)
