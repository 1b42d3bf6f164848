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

Any other reasoning-gym task is a suite of its own: ``rg:TASK`` (``rg:gcd``, ``rg:countdown``), or
several in one suite, ``rg:gcd+lcm`` (:func:`suite_tasks`), graded by the same rules below (a task
not in the table is numeric when its gold answer is a number, yes/no when it is yes or no, and
otherwise needs its own verifier's full marks).

Items are taken round-robin over the task types: item ``k`` of a suite is item ``k // T`` of
task type ``k % T``; task type ``t`` is generated with seed ``seed * 1000 + t``, so the same
``(n, seed)`` always gives the same questions.

Grading (these grades are also the training reward, so a wrong-looking answer must fail):

- an empty answer is wrong;
- a numeric task's answer must be ONE final value (:func:`single_value`): a number, a fraction
  or ``\\frac{a}{b}``, optionally as ``x = ...``, inside ``\\boxed{}`` / ``$...$``, with a
  currency sign or a few unit words. A restated expression (``-425 * 236 / 2``), a hedge
  (``6 or 5``, ``maybe 80 but 90``) or several candidates (``6, 5``) is wrong even when
  ``math-verify`` would evaluate it to the gold value. The value is then compared exactly
  (as a fraction) or, failing that, by ``math-verify`` (so ``-4.0`` and ``x = -4`` count for
  ``-4``);
- a yes/no task (syllogism) takes exactly ``yes`` or ``no`` (case and a final period aside);
- other logic tasks need the task's own verifier (``score_answer``) to give full marks, and an
  answer with a hedge word (``or``, ``maybe``, ``perhaps`` ...) is wrong (propositional logic,
  whose formulas may say ``or``, only rejects the other hedges).

``score`` is the verifier's own score, which gives partial credit on some tasks.
"""

from __future__ import annotations

import logging
import math
import re
from fractions import Fraction
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
RG_PREFIX = "rg:"  # suite name prefix for any reasoning-gym task: rg:gcd, rg:gcd+lcm


def registered_tasks() -> list[str]:
    """Every task name reasoning-gym registers."""
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def suite_tasks(name: str) -> tuple[str, ...]:
    """The task types of a reasoning-gym suite: ``math``, ``logic`` or ``rg:TASK[+TASK...]``.
    ValueError naming the bad part (and where to find the task names) otherwise."""
    if name == "math":
        return MATH_TASKS
    if name == "logic":
        return LOGIC_TASKS
    if not name.startswith(RG_PREFIX):
        raise ValueError(f"{name!r} is not a reasoning-gym suite: use math, logic or rg:TASK (e.g. rg:gcd)")
    tasks = tuple(dict.fromkeys(t.strip() for t in name[len(RG_PREFIX):].split("+") if t.strip()))
    if not tasks:
        raise ValueError(f"suite {name!r} names no task: write rg:TASK or rg:TASK+TASK (e.g. rg:gcd+lcm)")
    known = registered_tasks()
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown reasoning-gym task(s) {unknown} in {name!r}; reasoning-gym has: {', '.join(known)}")
    return tasks


def reasoning_gym_suite(name: str) -> ReasoningGymSuite:
    """The suite ``name`` (see :func:`suite_tasks`)."""
    return ReasoningGymSuite(name, suite_tasks(name))


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


YES_NO_TASKS: frozenset[str] = frozenset({"syllogism"})
KNOWN_TASKS: frozenset[str] = frozenset(MATH_TASKS + LOGIC_TASKS)


def _answer_kind(task: str, entry: dict) -> str:
    """How an answer is read: "numeric" (one final value), "yes/no" or "verifier". The tasks of the
    math and logic suites by the tables above; any other task by its gold answer's form."""
    if task in KNOWN_TASKS:
        return "numeric" if task in NUMERIC_TASKS else "yes/no" if task in YES_NO_TASKS else "verifier"
    gold = entry.get("answer")
    if gold is None:
        return "verifier"
    g = str(gold).strip()
    if g.lower() in ("yes", "no"):
        return "yes/no"
    return "numeric" if as_fraction(g) is not None else "verifier"


_HEDGE_RE = re.compile(
    r"\b(or|maybe|perhaps|probably|possibly|either|approximately|approx|about|around|roughly|"
    r"between|but|likely|unsure|guess)\b|\?", re.IGNORECASE)
_HEDGE_NOT_OR_RE = re.compile(
    r"\b(maybe|perhaps|probably|possibly|either|unsure|guess)\b|\?", re.IGNORECASE)
_NUMBER = r"[-+−]?(?:\d+(?:\.\d+)?|\.\d+)"
_VALUE_RE = re.compile(
    rf"(?P<num>{_NUMBER}(?:\s*/\s*{_NUMBER})?%?)"  # 12, -4.0, 3/4, 50%
    r"(?P<unit>(?:\s+[A-Za-z][A-Za-z/\-]*){0,3})"  # a few unit words: legs, km/h
)
_FRAC_RE = re.compile(r"^([-+−]?)\\[dt]?frac\{\s*([-+−]?\d+)\s*\}\{\s*([-+−]?\d+)\s*\}$")
_PREFIX_RE = re.compile(
    r"^(?:(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*[:=]?\s*|[A-Za-z]\w{0,2}\s*=\s*)", re.IGNORECASE)
_THOUSANDS_RE = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d,])")


def _unwrap(s: str) -> str:
    """Strip one layer of ``$...$``, ``\\(...\\)``, ``\\boxed{...}``, ``**...**`` and a final period."""
    s = s.strip()
    while True:
        before = s
        for a, b in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"), ("`", "`")):
            if len(s) > len(a) + len(b) and s.startswith(a) and s.endswith(b):
                s = s[len(a):len(s) - len(b)].strip()
        if s.startswith("\\boxed{") and s.endswith("}"):
            s = s[len("\\boxed{"):-1].strip()
        s = s.rstrip(".").strip()
        if s == before:
            return s


def single_value(answer: str | None) -> str | None:
    """The one final value an answer states, normalized (``"x = -4.0"`` -> ``"-4.0"``), or None
    when the answer is empty, hedged, restates an expression or names several candidates."""
    if answer is None:
        return None
    s = _unwrap(answer)
    if not s or _HEDGE_RE.search(s):
        return None
    s = _unwrap(_PREFIX_RE.sub("", s, count=1))
    s = s.removeprefix("$").removeprefix("€").removeprefix("£").strip()
    s = _THOUSANDS_RE.sub(lambda m: m.group(1).replace(",", ""), s)
    m = _FRAC_RE.match(s)
    num = f"{m.group(1)}{m.group(2)}/{m.group(3)}" if m else None
    if num is None:
        m = _VALUE_RE.fullmatch(s)
        if m is None:
            return None
        num = re.sub(r"\s+", "", m.group("num"))
    num = num.replace("−", "-")
    if "/" in num:  # a fraction is a value only in lowest terms: 100/4 restates 25
        top, bottom = num.rstrip("%").split("/")
        if not (top.lstrip("+-").isdigit() and bottom.lstrip("+-").isdigit()):
            return None
        t, b = int(top), int(bottom)
        if abs(b) <= 1 or math.gcd(t, b) != 1:
            return None
    return num


def as_fraction(s: str) -> Fraction | None:
    try:
        if s.endswith("%"):
            return Fraction(s[:-1]) / 100
        return Fraction(s.replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return None


def grade_reasoning_gym(task: str, dataset: Any, entry: dict, answer: str | None) -> Grade:
    """Grade one answer; see the module docstring for the rules."""
    if answer is None:
        return Grade(False, 0.0, "no answer")
    if not answer.strip():
        return Grade(False, 0.0, "empty answer")
    score = float(dataset.score_answer(answer, entry))
    kind = _answer_kind(task, entry)
    if kind == "numeric" and entry.get("answer") is not None:
        value = single_value(answer)
        if value is None:
            return Grade(False, 0.0, "not one final value")
        gold = str(entry["answer"]).strip()
        a, g = as_fraction(value), as_fraction(gold)
        if a is not None and g is not None:
            if a == g:
                return Grade(True, 1.0, "value")
            if task not in KNOWN_TASKS and float(dataset.score_answer(value, entry)) >= 1.0:
                return Grade(True, 1.0, "verifier")  # a task of its own tolerance (rounding, units)
            return Grade(False, min(score, 0.0), f"value {value} != {gold}")
        if math_verify_equal(gold, value):
            return Grade(True, 1.0, "math-verify")
        return Grade(False, min(score, 0.0), f"value {value} != {gold}")
    if kind == "yes/no":
        said = answer.strip().rstrip(".!").strip().lower()
        if said not in ("yes", "no"):
            return Grade(False, 0.0, "not exactly yes or no")
        ok = said == str(entry["answer"]).strip().lower()
        return Grade(ok, 1.0 if ok else 0.0, "yes/no")
    hedge = _HEDGE_NOT_OR_RE if task == "propositional_logic" else _HEDGE_RE
    # a task outside the suites may have answers that are prose (a reordered sentence, a word list):
    # a hedge word its own gold answer uses is part of the answer there, not a hedge
    gold_text = "" if task in KNOWN_TASKS else str(entry.get("answer") or "")
    if hedge.search(answer) and not hedge.search(gold_text):
        return Grade(False, 0.0, "hedged answer")
    if score >= 1.0:
        return Grade(True, 1.0, "verifier")
    return Grade(False, score, f"verifier score {score:.2f}")


def math_suite() -> ReasoningGymSuite:
    return ReasoningGymSuite("math", MATH_TASKS)


def logic_suite() -> ReasoningGymSuite:
    return ReasoningGymSuite("logic", LOGIC_TASKS)
