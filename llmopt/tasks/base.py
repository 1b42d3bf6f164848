"""What every evaluation suite shares: the item, the grade, the suite protocol and the prompts.

A generative suite (math, logic, code, format) turns ``(n, seed)`` into a list of ``Item``s,
each with a chat prompt, and grades the text inside the model's ``<answer>`` tag. The
perplexity suite has items with text to score instead of a prompt. Items are deterministic in
``(n, seed, shots)`` so two configurations can be compared on exactly the same items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

SUITE_NAMES: tuple[str, ...] = ("math", "logic", "code", "ppl", "format", "passkey", "needle", "longppl")
DEFAULT_MODEL = "smollm2-135m-instruct"

# The format the competition grades (see llmopt.reasoning.format), asked for in every prompt.
FORMAT_SPEC = (
    "Reply in exactly this form and nothing else:\n"
    "<think>\nyour step-by-step reasoning\n</think>\n"
    "<answer>\nyour final answer\n</answer>"
)

REASONING_SYSTEM_PROMPT = (
    "You are a careful problem solver. Think through the problem step by step inside "
    "<think> and </think>, then write only the final answer inside <answer> and </answer>.\n"
    + FORMAT_SPEC
)

CODE_SYSTEM_PROMPT = (
    "You are an expert Python programmer. Think about the task inside <think> and </think>, "
    "then write the complete Python function, with the imports it needs, inside <answer> and "
    "</answer> as plain code.\n" + FORMAT_SPEC.replace("your final answer", "your Python code")
)

Message = dict[str, str]


@dataclass
class Item:
    """One evaluation item.

    ``messages`` is the chat prompt (empty for perplexity items, which carry ``text``);
    ``reference`` is the gold answer kept for audit; ``payload`` is what the grader needs and
    is never written to result files.
    """

    suite: str
    id: str
    task: str
    messages: list[Message]
    reference: str
    text: str = ""
    payload: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Grade:
    """A graded answer: ``correct`` counts toward accuracy, ``score`` is the task's own
    (possibly partial) score in [0, 1], ``detail`` says why."""

    correct: bool
    score: float
    detail: str = ""


class GenerativeSuite(Protocol):
    """A suite whose items are answered by generation and graded on the extracted answer."""

    name: str

    def items(self, n: int, seed: int, shots: int = 0) -> list[Item]: ...

    def grade(self, item: Item, answer: str | None, output: str) -> Grade: ...


def chat_prompt(
    system: str, question: str, demos: list[tuple[str, str]] | None = None
) -> list[Message]:
    """System message, optional few-shot user/assistant turns, then the question."""
    messages: list[Message] = [{"role": "system", "content": system}]
    for q, a in demos or []:
        messages.append({"role": "user", "content": q})
        messages.append({"role": "assistant", "content": a})
    messages.append({"role": "user", "content": question})
    return messages


def demo_reply(think: str, answer: str) -> str:
    """An assistant turn in the exact competition format, for few-shot demos."""
    return f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"


def interleave(groups: list[list[Any]], n: int) -> list[Any]:
    """Round-robin over groups until n elements are taken (or all are used)."""
    out: list[Any] = []
    i = 0
    while len(out) < n and any(i < len(g) for g in groups):
        for g in groups:
            if i < len(g) and len(out) < n:
                out.append(g[i])
        i += 1
    return out
