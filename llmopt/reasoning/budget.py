"""Thinking budgets: where a sequence is in the think/answer format and when the engine closes
its thinking for it.

The engine keeps one ``ThinkTracker`` per sequence and updates it from the output text after
every appended token (``update``). The tracker knows the phase:

- ``PENDING``: the output is still a prefix of ``<think>`` (nothing decided yet);
- ``THINKING``: the output starts with ``<think>`` (or the prompt ended with ``<think>``, the
  assistant prefix forced by the caller) and ``</think>`` has not been written;
- ``ANSWER``: ``</think>`` was written (by the model or by the engine);
- ``NONE``: the output does not start with ``<think>``: budgets and early exit do nothing.

Think tokens are output tokens counted from the start of the output (the ``<think>`` tag's own
tokens included) up to the closing: for a model-written ``</think>`` up to and including the
token that completed it, for an engine-written one the tokens before the forced text.

``budget_limit`` is the token count at which the engine forces ``CLOSE_TEXT`` (tokenized with
the model's tokenizer, appended as one chunk that the next step computes like a prefill chunk):
the request's ``think_budget``, lowered so that the closing text and ``ANSWER_RESERVE_TOKENS``
of answer still fit ``max_tokens``. In a budgeted sequence whose answer has not closed when only
the tokens of ``ANSWER_CLOSE_TEXT`` still fit ``max_tokens`` (or the request's ``answer_budget``:
at most that many tokens after thinking ended, tags included), the engine writes that too, so the
output ends with ``</answer>`` (an answer cut short, but the format holds). When a sequence with a
budget or early exit ends (EOS) inside the think part, the engine writes ``CLOSE_TEXT`` instead of
the EOS and the model answers; inside the answer, it writes ``</answer>`` and the sequence ends.

A confidence-gated budget (``think_budget_threshold``) does not cut blindly at the budget: there
the engine tries the answer (an early-exit probe, ``llmopt.reasoning.early_exit``, forked at the
budget instead of at a pause) and closes thinking only when the trial answer's mean token
probability is above the threshold (the parent adopts the trial answer, ``closed_by =
"budget_probe"``); otherwise thinking goes on and is tried again every ``early_exit_min_gap``
tokens, up to the hard cap ``think_budget_max`` (default: where the answer still fits
``max_tokens``), where it is closed as a plain budget.

Low-confidence exit (``SamplingParams.low_confidence_exit = p``, :func:`doubts`): when the model
chooses a think token with a probability below ``p`` (greedy or sampled; the model's probability,
before temperature and top-k / top-p, as ``logprobs`` reports it), the engine writes ``CLOSE_TEXT`` in place of that token (``closed_by =
"low_confidence"``) and the model answers from what it has. The opposite of early exit: it stops
thinking that has turned into guessing (on the shipped 135M model nearly all of it ends wrong and
runs long), not thinking that is already sure; the idea is DeepConf's online trace termination
(Fu et al. 2025, lowest group confidence), with a group of one token. docs/reasoning.md measures it.

Think gate (``SamplingParams.think_gate = K``, ``think_gate_threshold = p``, :meth:`ThinkTracker.gate_fails`):
when the model has chosen K think tokens, the engine looks at how sure it was of them: if their mean token
log-probability is below ``log(p)`` (their geometric-mean probability below p), it writes ``CLOSE_TEXT``
in place of the K-th token (``closed_by = "think_gate"``) and the model answers from what it has; one
look per request, at token K. On the shipped 135M model an unsure start of the think part predicts a
wrong end (docs/reasoning.md: among the outputs still thinking after 32 tokens, the mean log-probability
of those 32 ranks right above wrong with AUC 0.84), while its right answers start sure of themselves.
DeepConf (Fu et al. 2025) terminates traces on a low sliding-window confidence; a sliding window
cut the long right answers here, a fixed early window did not.

Difficulty exit (``SamplingParams.difficulty_exit = t``, ``difficulty_exit_tokens = K``,
:meth:`ThinkTracker.difficulty_fails`): the engine's difficulty probe (``llmopt.reasoning.difficulty``)
reads the prompt's last hidden state when the prompt is computed and gives P(wrong); above ``t`` the
engine closes thinking in place of the K-th think token (``closed_by = "difficulty"``), as the think
gate does: a budget set from the prompt's difficulty. A second tier (``difficulty_budget = B``,
``difficulty_budget_threshold = t2``) caps the thinking of prompts above ``t2`` at B think tokens the
same way; a prompt above both gets the smaller cap. The gate catches unsure starts; this catches the
sure-looking starts of prompts the model gets wrong anyway (on the shipped 135M model: leg counting).

Jump-forward (``SamplingParams.jump_forward``, :func:`jump_forward_ids`): once the model has written
the first token of a tag of the format, the engine appends the rest of the tag's scaffolding
(``<think>\n``, ``</think>\n<answer>\n``, ``</answer>``) as one chunk, computed in the next step
like a prefill chunk, instead of decoding it token by token. On a model that writes the format
greedily these are the tokens it would have written (docs/reasoning.md measures how often).

All functions here are pure; ``ThinkTracker`` is plain state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from llmopt.reasoning.loops import LoopDetector

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# jump-forward: the tags as the trained model spells them (no newline after <think> or <answer>); the rest
# of one (THINK_OPEN, THINK_END_TEXT, ANSWER_CLOSE_TEXT) is written at once after its first token
THINK_END_TEXT = "</think>\n<answer>"
CLOSE_TEXT = "</think>\n<answer>\n"  # what the engine writes to end thinking
ANSWER_CLOSE_TEXT = "</answer>"  # what a budgeted sequence gets when max_tokens is about to cut its answer
ANSWER_RESERVE_TOKENS = 24  # answer tokens a think budget leaves inside max_tokens


class Phase(Enum):
    PENDING = "pending"
    THINKING = "thinking"
    ANSWER = "answer"
    NONE = "none"


def _check_token_budget(name: str, value: int | None, unit: str, none_means: str) -> None:
    """``value`` is None or an integer >= 1 (not a bool); else a ValueError naming ``name``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1 ({unit}) or None for {none_means}, got {value!r}")


def _check_probability(name: str, value: float | None, meaning: str, optional: bool) -> None:
    """``value`` is a probability in (0, 1) (not a bool), or None when ``optional`` (off); else a ValueError
    naming ``name`` and saying what it means."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a probability in (0, 1) ({meaning}){' or None for off' if optional else ''}, "
                         f"got {value!r}")


def _check_think_tokens(name: str, value: int | None, meaning: str, optional: bool) -> None:
    """``value`` is a whole number of think tokens >= 1 (not a bool), or None when ``optional`` (off)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number of think tokens >= 1 ({meaning})"
                         f"{' or None for off' if optional else ''}, got {value!r}")


def check_think_budget(think_budget: int | None) -> None:
    _check_token_budget("think_budget", think_budget, "tokens of thinking", "no budget")


def prompt_opens_think(prompt_tail: str) -> bool:
    """True when the prompt ends with ``<think>`` (and optional whitespace): the caller forced the
    assistant prefix, so the output starts inside the think part."""
    return prompt_tail.rstrip().endswith(THINK_OPEN)


def check_answer_budget(answer_budget: int | None) -> None:
    _check_token_budget("answer_budget", answer_budget, "tokens after thinking ends", "no limit")


def check_gated_budget(think_budget: int | None, threshold: float | None, budget_max: int | None) -> None:
    """A confidence-gated budget: ``threshold`` in (0, 1] needs a ``think_budget``; ``budget_max`` (the hard
    cap) needs the threshold and is >= ``think_budget``."""
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
            raise ValueError(f"think_budget_threshold must be in (0, 1] (mean token probability of the trial answer "
                             f"tried at the budget; 1.0 never cuts) or None to cut at the budget, got {threshold!r}")
        if think_budget is None:
            raise ValueError("think_budget_threshold gates a think budget: set think_budget too")
    if budget_max is not None:
        _check_token_budget("think_budget_max", budget_max, "hard cap on thinking", "max_tokens")
        if threshold is None:
            raise ValueError("think_budget_max is the hard cap of a confidence-gated budget: set "
                             "think_budget_threshold too (or use think_budget alone for a fixed cut)")
        assert think_budget is not None
        if budget_max < think_budget:
            raise ValueError(f"think_budget_max ({budget_max}) must be >= think_budget ({think_budget})")


def check_low_confidence_exit(value: float | None) -> None:
    """``low_confidence_exit``: None (off) or a probability in (0, 1)."""
    _check_probability("low_confidence_exit", value, "thinking is closed in place of a think token the model chose "
                       "with a lower probability", optional=True)


DEFAULT_THINK_GATE_THRESHOLD = 0.86  # their geometric-mean probability below which thinking is closed


def check_think_gate(tokens: int | None, threshold: float) -> None:
    """``think_gate``: None (off) or think tokens >= 1; ``think_gate_threshold``: a probability in (0, 1)."""
    _check_think_tokens("think_gate", tokens, "after them the engine judges how sure the model was of them",
                        optional=True)
    _check_probability("think_gate_threshold", threshold, "thinking is closed when the first think_gate think tokens' "
                       "geometric-mean probability is below it", optional=False)


# difficulty exit (llmopt.reasoning.difficulty): think tokens a prompt judged hard gets; chosen on the probe's
# training records (16 cut as many right answers as 24 and left 3 points fewer of the tokens; docs/reasoning.md)
DEFAULT_DIFFICULTY_TOKENS = 16
# difficulty budget: the P(wrong) above which a prompt's thinking is capped at SamplingParams.difficulty_budget
DEFAULT_DIFFICULTY_BUDGET_THRESHOLD = 0.8


def check_difficulty_budget(tokens: int | None, threshold: float) -> None:
    """``difficulty_budget``: None (off) or think tokens >= 1; ``difficulty_budget_threshold``: a probability in (0, 1)."""
    _check_token_budget("difficulty_budget", tokens, "think tokens of a prompt the difficulty probe judges likely wrong",
                        "off")
    _check_probability("difficulty_budget_threshold", threshold, "the P(wrong) above which difficulty_budget caps "
                       "thinking", optional=False)


def difficulty_cap(p_wrong: float | None, tiers: tuple[tuple[float | None, int | None], ...]) -> int | None:
    """Think tokens a prompt with this P(wrong) gets under ``tiers`` of (threshold, think tokens): the fewest
    of the tiers whose threshold it is above; None without an estimate or when none applies."""
    if p_wrong is None:
        return None
    caps = [k for t, k in tiers if t is not None and k is not None and p_wrong > t]
    return min(caps) if caps else None


def check_difficulty_exit(threshold: float | None, tokens: int) -> None:
    """``difficulty_exit``: None (off) or a probability in (0, 1); ``difficulty_exit_tokens``: think tokens >= 1."""
    _check_probability("difficulty_exit", threshold, "thinking is closed early when the model's difficulty probe "
                       "gives the prompt a higher chance of a wrong answer", optional=True)
    _check_think_tokens("difficulty_exit_tokens", tokens, "where a prompt judged hard stops thinking", optional=False)


def doubts(t: ThinkTracker, logprob: float, low_confidence_exit: float | None) -> bool:
    """Low-confidence exit: the sequence is thinking and the model chose its next token with a
    probability below ``low_confidence_exit`` (a guess: what follows it is likely wasted)."""
    return (low_confidence_exit is not None and t.phase == Phase.THINKING and t.closed_by is None
            and logprob < math.log(low_confidence_exit))


def budget_limit(think_budget: int | None, max_tokens: int, close_len: int) -> int | None:
    """Output tokens after which thinking is closed, or None without a budget."""
    if think_budget is None:
        return None
    return max(1, min(think_budget, max_tokens - close_len - ANSWER_RESERVE_TOKENS))


@dataclass
class ThinkTracker:
    """Where one sequence is in the format, plus what budgets and early exit did to it."""

    opened_in_prompt: bool = False
    phase: Phase = Phase.PENDING
    think_tokens: int = 0
    # "model" | "budget" | "budget_probe" (a gated budget's confident trial answer) | "early_exit" | "loop" |
    # "low_confidence" (a think token chosen below SamplingParams.low_confidence_exit) | "think_gate" (an unsure
    # start: SamplingParams.think_gate) | "difficulty" (a prompt judged hard: difficulty_exit / difficulty_budget) |
    # "eos" (the model ended inside <think>)
    closed_by: str | None = None
    forced_tokens: int = 0  # tokens the engine wrote (closing texts, adopted trial answers)
    answer_closed: bool = False  # "</answer>" written
    # early exit
    probe: Any = None  # the probe sequence in flight (at most one)
    probe_for_budget: bool = False  # that probe was forked at a gated think budget (not at a pause)
    probes: int = 0
    budget_probes: int = 0  # of those, forked at a confidence-gated think budget
    probe_tokens: int = 0  # tokens the probes computed (prefill not served by the prefix cache + decoded)
    probe_prompt_tokens: int = 0
    probe_cached_tokens: int = 0  # of the probes' prompts, served by the prefix cache
    last_probe_at: int = 0  # think tokens when the last probe was forked
    confidences: list[float] = field(default_factory=list)  # of each finished probe, -1 = no answer
    exit_at: int | None = None  # think tokens when early exit (or a gated budget's probe) closed thinking
    loop: LoopDetector | None = None  # loop exit (llmopt.reasoning.loops): fed the sampled think tokens
    gate_tokens: int = 0  # think gate: think tokens seen (up to SamplingParams.think_gate), and their logprob sum
    gate_logprob: float = 0.0
    # difficulty exit / budget: the difficulty probe's P(wrong) of the prompt (set when the prompt's last row is
    # computed) and the think tokens counted towards its cap (difficulty_cap)
    p_wrong: float | None = None
    judged_tokens: int = 0
    _scanned: int = 0  # text chars already searched for the closing tag

    def __post_init__(self) -> None:
        if self.opened_in_prompt:
            self.phase = Phase.THINKING

    def update(self, text: str, num_output_tokens: int) -> None:
        """Advance the phase after a token was appended; ``text`` is the whole output so far."""
        if self.phase == Phase.PENDING:
            if text.startswith(THINK_OPEN):
                self.phase = Phase.THINKING
                self._scanned = len(THINK_OPEN)
            elif not THINK_OPEN.startswith(text):
                self.phase = Phase.NONE
        if self.phase == Phase.THINKING:
            start = max(self._scanned - len(THINK_CLOSE) + 1, len(THINK_OPEN) if not self.opened_in_prompt else 0)
            if THINK_CLOSE in text[start:]:
                self.phase = Phase.ANSWER
            if self.closed_by is None:  # not while the engine writes its closing text
                self.think_tokens = num_output_tokens
                if self.phase == Phase.ANSWER:
                    self.closed_by = "model"
            self._scanned = len(text)
        if self.phase == Phase.ANSWER and not self.answer_closed:
            self.answer_closed = ANSWER_CLOSE_TEXT in text[max(0, text.find(THINK_CLOSE)):]

    def gate_open(self, tokens: int | None) -> bool:
        """The think gate of ``tokens`` still counts: thinking (``<think>`` complete, not closed) and fewer
        than ``tokens`` think tokens seen."""
        return tokens is not None and self.phase == Phase.THINKING and self.closed_by is None \
            and self.gate_tokens < tokens

    def gate_fails(self, logprob: float, tokens: int | None, threshold: float) -> bool:
        """Think gate: take the log-probability of the think token the model just chose (before it is
        appended); True at the ``tokens``-th think token if their mean is below ``log(threshold)``
        (then thinking is closed in place of that token). Tokens before ``<think>`` is complete and
        after thinking ended do not count."""
        if tokens is None or not self.gate_open(tokens):
            return False
        self.gate_tokens += 1
        self.gate_logprob += logprob
        return self.gate_tokens == tokens and self.gate_logprob / tokens < math.log(threshold)

    def difficulty_fails(self, tiers: tuple[tuple[float | None, int | None], ...]) -> bool:
        """Difficulty exit and budget: counts a think token the model chose (before it is appended; as
        ``gate_fails`` counts); True at the ``difficulty_cap``-th for the prompt's P(wrong) under ``tiers``
        (then thinking is closed in place of that token). Off without a judged prompt or a tier that applies."""
        cap = difficulty_cap(self.p_wrong, tiers)
        if cap is None or self.phase != Phase.THINKING or self.closed_by is not None or self.judged_tokens >= cap:
            return False
        self.judged_tokens += 1
        return self.judged_tokens == cap

    def close(self, num_output_tokens: int, by: str) -> None:
        """The engine ends thinking now (before appending the closing text)."""
        self.think_tokens = num_output_tokens
        self.closed_by = by

    def stats(self, num_output_tokens: int) -> ReasoningStats:
        think = self.think_tokens if self.phase in (Phase.THINKING, Phase.ANSWER) else 0
        cached = self.probe_cached_tokens / self.probe_prompt_tokens if self.probe_prompt_tokens else None
        return ReasoningStats(self.phase.value, think, num_output_tokens - think, self.closed_by,
                              self.forced_tokens, self.probes, self.probe_tokens, cached,
                              list(self.confidences), self.exit_at, self.p_wrong)


def jump_forward_ids(t: ThinkTracker, output_ids: list[int], open_ids: list[int], think_end_ids: list[int],
                     answer_close_ids: list[int]) -> list[int]:
    """Jump-forward of the format's scaffolding: the tokens the format forces once the model has written
    the first token of one of its tags, which the engine appends in one step instead of one decode step
    each. ``open_ids`` / ``think_end_ids`` / ``answer_close_ids`` are the tokens of ``THINK_OPEN``,
    ``THINK_END_TEXT`` and ``ANSWER_CLOSE_TEXT``:

    - the output so far is the first token of ``<think>``: the rest of it;
    - in the think part, the last token is the first of ``</think>\n<answer>``: the rest of it;
    - in an open answer, the last token is the first of ``</answer>``: the rest of it.

    Empty when none applies (or a tag's text is a single token)."""
    if t.phase == Phase.PENDING and output_ids == open_ids[:1]:
        return open_ids[1:]
    if t.phase == Phase.THINKING and t.closed_by is None and output_ids[-1:] == think_end_ids[:1]:
        return think_end_ids[1:]
    if t.phase == Phase.ANSWER and not t.answer_closed and output_ids[-1:] == answer_close_ids[:1]:
        return answer_close_ids[1:]
    return []


def answer_limit(t: ThinkTracker, max_tokens: int, answer_budget: int | None) -> int:
    """Output tokens at which a steered sequence's answer must be closed: ``max_tokens``, or with an
    ``answer_budget`` and thinking closed by the engine (a budget, an exit, the gate, an EOS inside it),
    that many tokens after thinking ended (the closing tags included), if sooner. An answer after the
    model's own ``</think>`` is not capped: it is the model's finished answer (a code answer needs more
    than the 24 tokens measured for cut-off math and logic answers)."""
    if answer_budget is None or t.closed_by == "model":
        return max_tokens
    return min(max_tokens, t.think_tokens + answer_budget)


def should_force_answer_close(t: ThinkTracker, num_output_tokens: int, limit: int, close_len: int) -> bool:
    """A budgeted sequence in its answer whose room before ``limit`` (:func:`answer_limit`) is down to
    the closing tag."""
    return (t.phase == Phase.ANSWER and not t.answer_closed
            and limit - num_output_tokens <= close_len)


@dataclass(frozen=True)
class ReasoningStats:
    """What a finished (or running) output spent on thinking; in ``RequestOutput.reasoning``."""

    phase: str  # "pending" | "thinking" | "answer" | "none"
    think_tokens: int  # 0 when the output never opened <think>
    answer_tokens: int  # the rest of the output (closing tags included)
    closed_by: str | None  # who wrote </think>: "model", or the engine at "budget", "budget_probe", "early_exit",
    # "loop", "low_confidence", "think_gate", "difficulty", "eos";
    # None: open
    forced_tokens: int  # tokens the engine wrote into the output
    probes: int  # early-exit probes run for this request
    probe_tokens: int  # tokens those probes computed
    probe_prefix_hit_rate: float | None  # share of the probes' prompt tokens served by the prefix cache
    probe_confidences: list[float]  # confidence of each probe's trial answer (-1: it wrote no answer)
    exit_at: int | None  # think tokens when early exit fired
    p_wrong: float | None = None  # the difficulty probe's P(wrong) of the prompt (difficulty_exit / difficulty_budget)

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)
