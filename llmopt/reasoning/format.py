"""The competition's think/answer output format: parsing and scoring.

The rule is a full match of ``^<think>(.*?)</think>\\s*<answer>(.*?)</answer>$`` (DOTALL) on the
raw model output; the answer that gets graded is the text inside ``<answer>``.

We apply the pattern with ``re.fullmatch``, the strictest reading of "full match":

- the output must start with ``<think>`` (no leading space or newline) and end with
  ``</answer>`` (no trailing newline, even though ``$`` alone would allow one before the end);
- nothing may stand between ``</think>`` and ``<answer>`` but whitespace;
- the lazy groups still backtrack, so nested or repeated tags do not break the match: in
  ``<think>a</think>b</think><answer>x</answer>`` the think group is ``a</think>b``, and in
  ``<think>t</think><answer>1</answer><answer>2</answer>`` the answer group is
  ``1</answer><answer>2``. The pattern says so; a stricter grader would only be a guess.

All functions here are pure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THINK_ANSWER_PATTERN = r"^<think>(.*?)</think>\s*<answer>(.*?)</answer>$"
THINK_ANSWER_RE = re.compile(THINK_ANSWER_PATTERN, re.DOTALL)
_LAST_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass(frozen=True)
class ParsedOutput:
    """A model output split by the competition format.

    ``think`` and ``answer`` are the raw group texts (not stripped), or None when the output
    does not match the format.
    """

    format_ok: bool
    think: str | None
    answer: str | None


def parse_output(text: str) -> ParsedOutput:
    """Split ``text`` into think and answer if it fully matches the format."""
    m = THINK_ANSWER_RE.fullmatch(text)
    if m is None:
        return ParsedOutput(False, None, None)
    return ParsedOutput(True, m.group(1), m.group(2))


def format_ok(text: str) -> bool:
    """True when the raw output fully matches the think/answer pattern."""
    return THINK_ANSWER_RE.fullmatch(text) is not None


def format_score(text: str) -> float:
    """1.0 for an output in the competition format, else 0.0."""
    return 1.0 if format_ok(text) else 0.0


def extract_answer(text: str, lenient: bool = False) -> str | None:
    """The answer to grade, stripped of surrounding whitespace.

    Strict (the default, as the competition grades): the ``<answer>`` group of a full format
    match, or None when the format does not match. Lenient (a diagnostic only): the content of
    the last complete ``<answer>...</answer>`` anywhere in the text, so a right answer with a
    broken format can be told apart from a wrong one.
    """
    parsed = parse_output(text)
    if parsed.format_ok:
        assert parsed.answer is not None
        return parsed.answer.strip()
    if not lenient:
        return None
    found = _LAST_ANSWER_RE.findall(text)
    return found[-1].strip() if found else None
