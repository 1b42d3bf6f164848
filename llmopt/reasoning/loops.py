"""Loop exit: stop thinking when the think part has started repeating itself.

A small reasoning model decoding greedily can fall into a loop inside ``<think>``
(``-(25) = 25, -(25) = 25, ...``) that runs until ``max_tokens``; such answers are almost never
right and they dominate the job completion time. ``LoopDetector`` watches the think tokens of one
sequence and says when the last ``ngram`` tokens have already occurred ``repeats`` times earlier in
the think part; the engine then closes thinking there (``</think>\\n<answer>\\n``, the mechanism of
a think budget, ``closed_by = "loop"``) and the model writes its answer.

Cost: O(1) per token. The hash of the last ``ngram`` tokens is a rolling polynomial hash (one
multiply-add to take the new token in, one to drop the token that leaves the window), and the
counts of the hashes seen so far are one dict per sequence. A loop of period ``p <= ngram`` tokens
is caught ``ngram + repeats * p`` tokens after it starts. Only exact token repeats count: a phrase
written twice, or short repeats such as ``, 1 + 1 = 2`` inside a longer varying line, do not fire.

All of this is pure; ``LoopDetector`` is plain state.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

DEFAULT_NGRAM = 8  # tokens in the window that must repeat (chosen by measurement: docs/reasoning.md)
DEFAULT_REPEATS = 2  # earlier occurrences of that window inside the think part
MAX_NGRAM = 256

_MOD = (1 << 61) - 1  # a Mersenne prime: collisions between distinct windows have probability ~ 1/2^61
_BASE = 1_000_003


def check_loop_exit(ngram: int, repeats: int) -> None:
    if isinstance(ngram, bool) or not isinstance(ngram, int) or not 2 <= ngram <= MAX_NGRAM:
        raise ValueError(f"loop_exit_ngram must be an integer in [2, {MAX_NGRAM}] (tokens in the window that must "
                         f"repeat), got {ngram!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"loop_exit_repeats must be an integer >= 1 (earlier occurrences of the window before "
                         f"thinking is closed), got {repeats!r}")


@dataclass(frozen=True)
class LoopExitConfig:
    ngram: int = DEFAULT_NGRAM
    repeats: int = DEFAULT_REPEATS

    def __post_init__(self) -> None:
        check_loop_exit(self.ngram, self.repeats)


@dataclass
class LoopDetector:
    """Feed the think tokens of one sequence in order; ``add`` returns True once the window of the
    last ``ngram`` tokens has occurred ``repeats`` times before (then the think part is looping)."""

    config: LoopExitConfig = field(default_factory=LoopExitConfig)
    tokens: int = 0  # tokens fed so far
    _window: deque[int] = field(default_factory=deque, repr=False)
    _hash: int = 0
    _drop: int = 0  # BASE ** (ngram - 1) mod MOD: the weight of the token that leaves the window
    _counts: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._drop = pow(_BASE, self.config.ngram - 1, _MOD)

    def add(self, token: int) -> bool:
        k = self.config.ngram
        if len(self._window) == k:
            self._hash = (self._hash - (self._window.popleft() + 1) * self._drop) % _MOD
        self._window.append(token)
        self._hash = (self._hash * _BASE + token + 1) % _MOD
        self.tokens += 1
        if len(self._window) < k:
            return False
        seen = self._counts.get(self._hash, 0)
        self._counts[self._hash] = seen + 1
        return seen >= self.config.repeats


def find_loop(tokens: list[int], config: LoopExitConfig | None = None) -> int | None:
    """How many tokens of ``tokens`` a ``LoopDetector`` takes to fire, or None if it never does."""
    d = LoopDetector(config or LoopExitConfig())
    for i, tok in enumerate(tokens):
        if d.add(tok):
            return i + 1
    return None
