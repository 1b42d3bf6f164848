"""Rewards for training, from the evaluation graders.

``total = format_weight * format + correct_weight * correct + length term``:

- ``format`` is 1 when the whole output matches the competition pattern
  (``llmopt.reasoning.format``), else 0;
- ``correct`` is 1 when the answer inside ``<answer>`` passes the task's grader (the strict
  graders of ``llmopt.tasks``: one final value, no hedges), else 0; an output out of format
  has no answer and is never correct;
- the optional length term (``length_penalty`` > 0) subtracts ``length_penalty * n / max_tokens``
  for ``n`` generated tokens, and a reply cut at ``max_tokens`` (which cannot close the answer)
  gets no format credit anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from llmopt.reasoning.format import parse_output
from llmopt.tasks.base import Grade


@dataclass
class RewardConfig:
    format_weight: float = 0.5
    correct_weight: float = 1.0
    length_penalty: float = 0.0

    def validate(self) -> None:
        from llmopt.train.common import require

        require(self.format_weight >= 0 and self.correct_weight >= 0,
                f"reward weights must be >= 0, got format {self.format_weight}, correct {self.correct_weight}")
        require(self.format_weight + self.correct_weight > 0, "at least one reward weight must be > 0")
        require(0 <= self.length_penalty <= 1, f"length penalty must be in [0, 1], got {self.length_penalty}")


@dataclass(frozen=True)
class Reward:
    total: float
    format_ok: bool
    correct: bool
    detail: str


def reward(text: str, grade: Callable[[str | None], Grade], num_tokens: int, max_tokens: int,
           cfg: RewardConfig | None = None) -> Reward:
    """Score one completion ``text`` of ``num_tokens`` tokens."""
    cfg = cfg or RewardConfig()
    parsed = parse_output(text)
    correct = False
    detail = "format mismatch"
    if parsed.format_ok:
        g = grade(parsed.answer.strip())
        correct, detail = g.correct, g.detail
    total = cfg.format_weight * float(parsed.format_ok) + cfg.correct_weight * float(correct)
    if cfg.length_penalty:
        total -= cfg.length_penalty * min(num_tokens, max_tokens) / max(1, max_tokens)
    return Reward(total, parsed.format_ok, correct, detail)
