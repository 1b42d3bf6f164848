"""Training data: reasoning-gym math and logic generators and procedurally generated code tasks.

Seeds (the one place they are written down):

- evaluation (``llmopt eval --seed S``) draws reasoning-gym task ``t`` with dataset seed
  ``S * 1000 + t`` and few-shot demos with ``(S + 7919) * 1000 + t``; code items are HumanEval;
- training draws task ``t`` of chunk ``c`` with dataset seed ``TRAIN_SEED_BASE + c * 1000 + t``
  (``TRAIN_SEED_BASE`` = 10**9), so every evaluation seed below ``EVAL_SEED_LIMIT`` (990_000)
  is disjoint from every training seed; :func:`check_eval_seed` enforces it;
- code training tasks are generated here (:data:`CODE_TEMPLATES`), never taken from HumanEval.

Distinct seeds give distinct generator streams; a short item (``2 + 3``) can still recur by
chance in both, as it would in any two samples of the same generator.

An :class:`Example` carries the question, a gold target in the competition format with a short
rationale (from the task's own metadata where it has one, e.g. GSM-symbolic's worked solution),
and a ``grade`` function: the evaluation graders (``llmopt.tasks``), which are also the reward.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmopt.tasks.base import CODE_SYSTEM_PROMPT, REASONING_SYSTEM_PROMPT, Grade, interleave
from llmopt.tasks.mathlogic import RG_PREFIX, grade_reasoning_gym, suite_tasks

from . import rationales

log = logging.getLogger(__name__)

TRAIN_SEED_BASE = 1_000_000_000
EVAL_SEED_LIMIT = 990_000
SUITES: tuple[str, ...] = ("math", "logic", "code")
# which system prompt a training prompt gets: the competition's, none (the chat template's own
# default), or the code suite's
SYSTEM_VARIANTS: tuple[str, ...] = ("reasoning", "none", "code")


class DatasetError(ValueError):
    """A training data specification that cannot give examples (unknown suite, empty set...)."""


def check_eval_seed(seed: int) -> None:
    """Raise when an evaluation seed could overlap the training seeds."""
    if not 0 <= seed < EVAL_SEED_LIMIT:
        raise DatasetError(f"evaluation seed {seed} may overlap training data: use 0 <= seed < {EVAL_SEED_LIMIT}")


@dataclass
class Example:
    suite: str
    task: str
    question: str
    answer: str  # gold final answer (or reference code)
    rationale: str  # a short think text for the gold target
    grade: Callable[[str | None], Grade] = field(repr=False)
    id: str = ""

    def target(self) -> str:
        """The gold reply in the competition format, compact: no newline inside the tags, so a
        newline is always followed by ``<answer>`` and a tag is never followed by another tag (with
        newlines inside the tags a briefly trained model learns "newline -> tag" and repeats tags)."""
        return f"<think>{self.rationale}</think>\n<answer>{self.answer}</answer>"

    def messages(self, system: str) -> list[dict[str, str]]:
        """The chat prompt under one of :data:`SYSTEM_VARIANTS`."""
        if system == "none":
            return [{"role": "user", "content": self.question}]
        if system == "reasoning":
            return [{"role": "system", "content": REASONING_SYSTEM_PROMPT},
                    {"role": "user", "content": self.question}]
        if system == "code":
            return [{"role": "system", "content": CODE_SYSTEM_PROMPT},
                    {"role": "user", "content": self.question}]
        raise DatasetError(f"unknown system prompt variant {system!r}: use one of {', '.join(SYSTEM_VARIANTS)}")


# ---- math and logic -------------------------------------------------------------------------------

_GENERIC_RATIONALE = {
    "basic_arithmetic": "I evaluate the expression step by step.",
    "chain_sum": "I add and subtract the numbers from left to right.",
    "leg_counting": "I multiply each animal count by its number of legs and add the results.",
    "simple_equations": "I isolate the variable on one side of the equation.",
    "gsm_symbolic": "I follow the quantities step by step.",
    "syllogism": "I check whether the conclusion must follow from both premises.",
    "aiw": "I count the siblings from the point of view of the person asked about.",
    "knights_knaves": "Knights always tell the truth and knaves always lie; I test each case.",
    "zebra_puzzles": "I combine the clues and eliminate the impossible placements.",
    "self_reference": "I test each number of true statements for consistency.",
    "propositional_logic": "I combine the premises to derive a conclusion that must hold.",
}


@functools.cache
def _leg_table() -> dict[str, int]:
    try:  # reasoning-gym's own table of legs per animal
        from reasoning_gym.arithmetic.leg_counting import ANIMALS
    except ImportError:
        return {}
    return dict(ANIMALS)


def _worked(task: str, entry: dict) -> str | None:
    """One operation per step where the task's metadata allows it (see ``rationales``)."""
    meta = entry.get("metadata", {})
    ans = str(entry.get("answer"))
    if task in ("basic_arithmetic", "chain_sum") and meta.get("expression"):
        return rationales.arithmetic_steps(meta["expression"], ans)
    if task == "leg_counting" and isinstance(meta.get("animals"), dict):
        return rationales.leg_steps(meta["animals"], _leg_table(), ans)
    if task == "simple_equations" and meta.get("equation") and meta.get("variable"):
        return rationales.equation_steps(meta["equation"], meta["variable"], ans)
    if task == "aiw":
        return rationales.count_plus_self_steps(ans, entry.get("question", ""))
    return None


def _rationale(task: str, entry: dict) -> str:
    meta = entry.get("metadata", {})
    ans = entry.get("answer")
    worked = _worked(task, entry)
    if worked is not None:
        return worked
    if task in ("basic_arithmetic", "chain_sum") and meta.get("expression"):
        return f"{meta['expression'].strip()} = {ans}"
    if task == "simple_equations" and meta.get("equation"):
        return f"Solve {meta['equation']} for {meta.get('variable', 'the variable')}: {meta.get('variable', 'it')} = {ans}"
    if task == "gsm_symbolic" and meta.get("answer_cot"):
        cot = " ".join(str(meta["answer_cot"]).split())
        if len(cot) <= 400:
            return cot
    return _GENERIC_RATIONALE.get(task, "I work through the problem step by step.")


def _gold(task: str, entry: dict) -> str | None:
    if task == "propositional_logic":
        return entry.get("metadata", {}).get("example_answer")
    ans = entry.get("answer")
    return None if ans is None else str(ans)


def reasoning_gym_examples(suite: str, n: int, chunk: int = 0) -> list[Example]:
    """``n`` training examples of a reasoning-gym suite (math, logic or rg:TASK[+TASK...]), round-robin over its task types, from
    the training seeds of ``chunk`` (see the module docstring)."""
    import reasoning_gym

    try:
        tasks = suite_tasks(suite)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    per = -(-n // len(tasks)) if n > 0 else 0
    groups: list[list[Example]] = []
    for t, task in enumerate(tasks):
        seed = TRAIN_SEED_BASE + chunk * 1000 + t
        ds = reasoning_gym.create_dataset(task, seed=seed, size=max(per, 1))
        group = []
        for i in range(per):
            entry = ds[i]
            gold = _gold(task, entry)
            if gold is None:
                continue
            group.append(Example(
                suite=suite, task=task, question=entry["question"], answer=gold,
                rationale=_rationale(task, entry),
                grade=(lambda a, _t=task, _d=ds, _e=entry: grade_reasoning_gym(_t, _d, _e, a)),
                id=f"train/{suite}/{task}/{seed}/{i}"))
        groups.append(group)
    return interleave(groups, n)


# ---- code ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CodeTemplate:
    """A small function task: ``make(rng)`` -> (signature, docstring, body, reference, test inputs)."""

    kind: str
    make: Callable[[random.Random], tuple[str, str, str, Callable[..., Any], list[tuple]]]


def _names(rng: random.Random, *options: str) -> str:
    return rng.choice(options)


def _t_add(rng):
    k = rng.randint(1, 9)
    name = _names(rng, "add_to_all", "shift_values", "increase_each", "plus_k")
    return (f"{name}(xs: list) -> list", f"Return a new list with {k} added to every element of xs.",
            f"    return [x + {k} for x in xs]", lambda xs: [x + k for x in xs],
            [([1, 2, 3],), ([],), ([-5, 0],)])


def _t_scale(rng):
    k = rng.randint(2, 7)
    name = _names(rng, "scale_all", "multiply_each", "times_k")
    return (f"{name}(xs: list) -> list", f"Return a new list with every element of xs multiplied by {k}.",
            f"    return [x * {k} for x in xs]", lambda xs: [x * k for x in xs],
            [([1, 2, 3],), ([],), ([-2, 0, 4],)])


def _t_count_gt(rng):
    k = rng.randint(0, 10)
    name = _names(rng, "count_above", "how_many_greater", "count_big")
    return (f"{name}(xs: list) -> int", f"Return how many elements of xs are greater than {k}.",
            f"    return sum(1 for x in xs if x > {k})", lambda xs: sum(1 for x in xs if x > k),
            [([1, 5, 12, 20],), ([],), ([k, k + 1, k - 1],)])


def _t_sum_even(rng):
    name = _names(rng, "sum_even", "even_total", "add_evens")
    return (f"{name}(xs: list) -> int", "Return the sum of the even numbers in xs.",
            "    return sum(x for x in xs if x % 2 == 0)", lambda xs: sum(x for x in xs if x % 2 == 0),
            [([1, 2, 3, 4],), ([],), ([-2, 7, 10],)])


def _t_reverse(rng):
    name = _names(rng, "reverse_text", "backwards", "flip_string")
    return (f"{name}(s: str) -> str", "Return the string s reversed.",
            "    return s[::-1]", lambda s: s[::-1], [("hello",), ("",), ("ab c",)])


def _t_vowels(rng):
    name = _names(rng, "count_vowels", "vowel_count", "num_vowels")
    return (f"{name}(s: str) -> int", "Return the number of vowels (a, e, i, o, u, either case) in s.",
            "    return sum(1 for c in s.lower() if c in 'aeiou')",
            lambda s: sum(1 for c in s.lower() if c in "aeiou"), [("Hello World",), ("",), ("AEIOUxyz",)])


def _t_range(rng):
    name = _names(rng, "spread", "value_range", "max_minus_min")
    return (f"{name}(xs: list) -> int", "Return the largest element of xs minus the smallest; 0 for an empty list.",
            "    return max(xs) - min(xs) if xs else 0", lambda xs: max(xs) - min(xs) if xs else 0,
            [([3, 9, 1],), ([],), ([5],)])


def _t_long_words(rng):
    k = rng.randint(2, 6)
    name = _names(rng, "long_words", "words_longer_than", "filter_long")
    return (f"{name}(words: list) -> list", f"Return the words longer than {k} characters, in their original order.",
            f"    return [w for w in words if len(w) > {k}]", lambda ws: [w for w in ws if len(w) > k],
            [(["a", "abcdefg", "abc", "abcd"],), ([],), (["x" * k, "y" * (k + 1)],)])


def _t_palindrome(rng):
    name = _names(rng, "is_palindrome", "reads_same_backwards", "palindrome")
    return (f"{name}(s: str) -> bool", "Return True if s reads the same forwards and backwards, else False.",
            "    return s == s[::-1]", lambda s: s == s[::-1], [("racecar",), ("ab",), ("",)])


def _t_factorial(rng):
    name = _names(rng, "factorial", "fact", "product_up_to")
    return (f"{name}(n: int) -> int", "Return n! (the product 1 * 2 * ... * n); 0! is 1.",
            "    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result",
            lambda n: __import__("math").factorial(n), [(0,), (5,), (7,)])


def _t_digit_sum(rng):
    name = _names(rng, "digit_sum", "sum_of_digits", "add_digits")
    return (f"{name}(n: int) -> int", "Return the sum of the decimal digits of the non-negative integer n.",
            "    return sum(int(d) for d in str(n))", lambda n: sum(int(d) for d in str(n)),
            [(0,), (1234,), (909,)])


def _t_dedupe(rng):
    name = _names(rng, "unique_in_order", "dedupe", "remove_duplicates")
    return (f"{name}(xs: list) -> list", "Return xs without repeated elements, keeping the first occurrence of each.",
            "    seen = set()\n    out = []\n    for x in xs:\n        if x not in seen:\n            seen.add(x)\n"
            "            out.append(x)\n    return out",
            lambda xs: list(dict.fromkeys(xs)), [([1, 2, 1, 3, 2],), ([],), ([4, 4, 4],)])


def _t_clamp(rng):
    lo = rng.randint(-5, 0)
    hi = rng.randint(1, 9)
    name = _names(rng, "clamp_all", "limit_values", "clip_list")
    return (f"{name}(xs: list) -> list", f"Return xs with every element limited to the range [{lo}, {hi}].",
            f"    return [min(max(x, {lo}), {hi}) for x in xs]", lambda xs: [min(max(x, lo), hi) for x in xs],
            [([-10, 0, 10],), ([],), ([lo, hi],)])


def _t_fib(rng):
    name = _names(rng, "fibonacci", "fib", "nth_fibonacci")
    return (f"{name}(n: int) -> int", "Return the n-th Fibonacci number, with fib(0) = 0 and fib(1) = 1.",
            "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
            lambda n: [0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89][n], [(0,), (1,), (10,)])


def _t_count_char(rng):
    ch = rng.choice("abcdexyz")
    name = _names(rng, "count_letter", "occurrences", "letter_count")
    return (f"{name}(s: str) -> int", f"Return how many times the letter '{ch}' occurs in s.",
            f"    return s.count('{ch}')", lambda s: s.count(ch), [(f"{ch}b{ch}",), ("",), ("hello",)])


CODE_TEMPLATES: tuple[CodeTemplate, ...] = tuple(CodeTemplate(f.__name__[3:], f) for f in (
    _t_add, _t_scale, _t_count_gt, _t_sum_even, _t_reverse, _t_vowels, _t_range, _t_long_words,
    _t_palindrome, _t_factorial, _t_digit_sum, _t_dedupe, _t_clamp, _t_fib, _t_count_char))


def code_question(signature: str, doc: str) -> str:
    """Phrased as the code suite phrases HumanEval problems."""
    return ("Complete the following Python function so that it does what its docstring says.\n\n"
            f"```python\ndef {signature}:\n    \"\"\"{doc}\"\"\"\n```")


def grade_generated_code(answer: str | None, entry: str, tests: list[tuple[tuple, Any]],
                         timeout_s: float = 5.0) -> Grade:
    """Run ``tests`` (arguments, expected result) against the answer's ``entry`` function in the
    sandbox; a pass needs every assert and a token printed after them."""
    import secrets

    from llmopt.tasks.code import extract_code
    from llmopt.tasks.sandbox import SandboxLimits, run_python

    if answer is None:
        return Grade(False, 0.0, "no answer")
    code = extract_code(answer, entry)
    if not code.strip():
        return Grade(False, 0.0, "empty answer")
    token = "llmopt-tests-done-" + secrets.token_hex(8)
    checks = "\n".join(f"assert {entry}(*{args!r}) == {want!r}" for args, want in tests)
    result = run_python(f"{code}\n\n{checks}\nprint({token!r})\n", SandboxLimits(timeout_s=timeout_s))
    if result.passed and result.stdout.rstrip().endswith(token):
        return Grade(True, 1.0, "tests passed")
    return Grade(False, 0.0, f"{result.status}"[:100])


def code_examples(n: int, chunk: int = 0) -> list[Example]:
    """``n`` generated code tasks, round-robin over :data:`CODE_TEMPLATES`, seeded from the
    training seeds of ``chunk``."""
    out = []
    for i in range(n):
        tpl = CODE_TEMPLATES[i % len(CODE_TEMPLATES)]
        rng = random.Random(TRAIN_SEED_BASE + chunk * 1000 + i)
        signature, doc, body, ref, inputs = tpl.make(rng)
        entry = signature.split("(")[0]
        tests = [(args, ref(*args)) for args in inputs]
        code = f"def {signature}:\n{body}"
        out.append(Example(
            suite="code", task=tpl.kind, question=code_question(signature, doc), answer=code,
            rationale=f"I write {entry} so that it does exactly what the docstring says.",
            grade=(lambda a, _e=entry, _t=tests: grade_generated_code(a, _e, _t)),
            id=f"train/code/{tpl.kind}/{TRAIN_SEED_BASE + chunk * 1000 + i}"))
    return out


def build_examples(suites: dict[str, int], chunk: int = 0, shuffle_seed: int = 0) -> list[Example]:
    """Examples for ``{suite: count}`` (math, logic, code), shuffled together."""
    if not suites or sum(suites.values()) <= 0:
        raise DatasetError("no training examples requested: give a positive count for math, logic or code")
    out: list[Example] = []
    for suite, n in suites.items():
        if n < 0:
            raise DatasetError(f"example count for {suite} must be >= 0, got {n}")
        if suite == "code":
            out += code_examples(n, chunk)
        elif suite in ("math", "logic") or suite.startswith(RG_PREFIX):
            out += reasoning_gym_examples(suite, n, chunk)
        else:
            raise DatasetError(f"unknown suite {suite!r}: use math, logic, code or {RG_PREFIX}TASK "
                               f"(any reasoning-gym task, e.g. {RG_PREFIX}gcd)")
    random.Random(shuffle_seed).shuffle(out)
    if not out:
        raise DatasetError("the requested suites gave no examples")
    return out


def parse_suites(spec: str) -> dict[str, int]:
    """``"math=60,logic=60,code=30"`` -> ``{"math": 60, ...}``."""
    out: dict[str, int] = {}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, sep, count = part.partition("=")
        if not sep or not count.strip().lstrip("-").isdigit():
            raise DatasetError(f"bad suite spec {part!r}: write suite=count, e.g. math=60,logic=60,code=30")
        out[name.strip()] = int(count)
    if not out:
        raise DatasetError("empty suite spec: write suite=count, e.g. math=60,logic=60,code=30")
    return out


def load_jsonl_examples(path: str | Path) -> list[Example]:
    """Your own questions: a JSONL file, one ``{"question": ..., "answer": ..., "rationale": ...}``
    per line (``rationale`` optional). Answers are graded as one final value when the gold is a
    number, else by exact (case-insensitive) match."""
    import json

    from llmopt.tasks.mathlogic import as_fraction, single_value

    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"dataset {str(p)!r} does not exist: give a JSONL file with question/answer lines")
    out: list[Example] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{p}:{n}: not JSON ({e.msg}): write one JSON object per line") from None
        if not isinstance(rec, dict) or not str(rec.get("question", "")).strip() or str(rec.get("answer", "")).strip() == "":
            raise DatasetError(f"{p}:{n}: needs non-empty \"question\" and \"answer\" fields")
        gold = str(rec["answer"]).strip()

        def grade(a: str | None, _g: str = gold) -> Grade:
            if a is None or not a.strip():
                return Grade(False, 0.0, "empty answer")
            gv = as_fraction(_g)
            if gv is not None:
                v = single_value(a)
                ok = v is not None and as_fraction(v) == gv
            else:
                ok = a.strip().rstrip(".").lower() == _g.rstrip(".").lower()
            return Grade(ok, float(ok), "value" if ok else "mismatch")

        out.append(Example(suite=str(rec.get("suite", "custom")), task=str(rec.get("task", "custom")),
                           question=str(rec["question"]), answer=gold,
                           rationale=str(rec.get("rationale") or "I work through the problem step by step."),
                           grade=grade, id=f"{p.name}:{n}"))
    if not out:
        raise DatasetError(f"dataset {str(p)!r} is empty: it needs at least one question/answer line")
    return out
