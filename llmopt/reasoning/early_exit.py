"""Confidence early exit (DEER-style): at a pause in the thinking, try the answer; stop thinking
when the trial answer is confident.

How the engine uses this module (``llmopt.engine.engine``):

1. After each token a thinking sequence appends, ``should_probe`` says whether to fork a probe:
   a transition marker (``DEFAULT_MARKERS``: a new paragraph, "Wait", "Alternatively", "So the
   answer", ...) ended inside the new token's text, no probe of this sequence is in flight, and
   at least ``min_gap`` think tokens were written since the sequence's start or last probe.
2. The probe is an internal sequence whose prompt is the parent's tokens plus the closing text
   ``</think>\\n<answer>\\n``, decoded greedily for at most ``probe_tokens`` tokens until
   ``</answer>``, with logprobs. Its prompt's full KV blocks are the parent's, found in the prefix
   cache (no recompute; only the parent's last partial block and the closing text are computed).
   The parent waits while its probe runs, so the decision depends on the parent's tokens alone:
   the same request gives the same output alone or in a batch.
3. When the probe finishes, ``trial_confidence`` is the mean token probability of its answer
   (the tokens before ``</answer>``); ``exit_now`` compares it with the threshold. Above it, the
   parent adopts the probe's tokens (closing text + trial answer + ``</answer>``) as its own
   output: they are exactly what the parent would write greedily from that point, so the answer
   is not decoded twice. A trial answer that ends with the end-of-sequence token instead of
   ``</answer>`` (an instruct model that does not close its tags) counts as ending there: the
   engine puts ``</answer>`` in place of the EOS. Otherwise the probe is dropped and the parent
   thinks on.

All functions here are pure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from llmopt.reasoning.budget import ANSWER_CLOSE_TEXT, Phase, ThinkTracker

DEFAULT_MARKERS: tuple[str, ...] = ("\n\n", "Wait", "Alternatively", "So the answer", "Therefore", "Hmm")
DEFAULT_THRESHOLD = 0.9
DEFAULT_MIN_GAP = 24  # think tokens between probes (and before the first)
DEFAULT_PROBE_TOKENS = 24  # most tokens a trial answer may take (the closing tag included)


@dataclass(frozen=True)
class EarlyExitConfig:
    threshold: float = DEFAULT_THRESHOLD
    min_gap: int = DEFAULT_MIN_GAP
    probe_tokens: int = DEFAULT_PROBE_TOKENS
    markers: tuple[str, ...] = DEFAULT_MARKERS

    def __post_init__(self) -> None:
        check_early_exit(self.threshold, self.min_gap, self.probe_tokens, self.markers)


def check_early_exit(threshold: float, min_gap: int, probe_tokens: int, markers: Sequence[str]) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"early_exit_threshold must be in (0, 1] (mean token probability of the trial "
                         f"answer; 1.0 never exits), got {threshold!r}")
    if isinstance(min_gap, bool) or not isinstance(min_gap, int) or min_gap < 1:
        raise ValueError(f"early_exit_min_gap must be an integer >= 1 (think tokens between probes), got {min_gap!r}")
    if isinstance(probe_tokens, bool) or not isinstance(probe_tokens, int) or probe_tokens < 2:
        raise ValueError(f"early_exit_probe_tokens must be an integer >= 2 (tokens of a trial answer), "
                         f"got {probe_tokens!r}")
    if not markers or not all(isinstance(m, str) and m for m in markers):
        raise ValueError(f"early_exit_markers must be a non-empty list of non-empty strings, got {markers!r}")


def at_transition(text: str, new_chars: int, markers: Sequence[str]) -> bool:
    """True when one of ``markers`` ends inside the last ``new_chars`` characters of ``text``."""
    if new_chars <= 0:
        return False
    for m in markers:
        start = max(0, len(text) - new_chars - len(m) + 1)
        i = text.find(m, start)
        if i >= 0 and i + len(m) > len(text) - new_chars:
            return True
    return False


def should_probe(t: ThinkTracker, num_output_tokens: int, text: str, new_chars: int, cfg: EarlyExitConfig) -> bool:
    """Fork a probe now? (thinking, none in flight, far enough from the last one, at a transition)."""
    return (t.phase == Phase.THINKING and t.probe is None
            and num_output_tokens - t.last_probe_at >= cfg.min_gap
            and at_transition(text, new_chars, cfg.markers))


def trial_confidence(logprobs: Sequence[float], pieces: Sequence[str]) -> float | None:
    """Mean token probability of a trial answer: over the tokens whose text starts before the
    first ``</answer>`` (the closing tag's own tokens are left out). None when the trial wrote no
    ``</answer>`` or an answer of only whitespace: no exit on that."""
    text = "".join(pieces)
    end = text.find(ANSWER_CLOSE_TEXT)
    if end < 0 or not text[:end].strip():
        return None
    probs, offset = [], 0
    for lp, piece in zip(logprobs, pieces):
        if offset >= end:
            break
        probs.append(math.exp(lp))
        offset += len(piece)
    return sum(probs) / len(probs) if probs else None


def exit_now(confidence: float | None, threshold: float) -> bool:
    """Exit when the trial answer's confidence is strictly above the threshold (so 1.0 never exits)."""
    return confidence is not None and confidence > threshold
