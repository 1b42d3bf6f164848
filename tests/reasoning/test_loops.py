"""Loop exit's detector: fires on a think part that repeats itself, not on varied or briefly repeated text."""

import re

import pytest

from llmopt.reasoning.loops import LoopDetector, LoopExitConfig, check_loop_exit, find_loop

# a word-level stand-in for a BPE tokenizer: numbers, words, single punctuation marks, spaces kept
_PIECES = re.compile(r" ?\d+| ?[A-Za-z]+| ?[^\sA-Za-z\d]|\s")


def toks(text: str) -> list[int]:
    vocab: dict[str, int] = {}
    return [vocab.setdefault(p, len(vocab)) for p in _PIECES.findall(text)]


# what the trained model wrote inside <think> before looping to max_tokens
LOOP_A = "Negate -25: -(-25) = 25." + " -(25) = 25," * 40
LOOP_B = "Add -14 and -14: " + " -14 + -14 = -14, -14 - -14 = -14," * 20
# worked steps that share short pieces (", 1 + 1 = 2", " legs each") but never a whole window
VARIED = ("Count the legs: 3 cows have 4 legs each, 3 * 4 = 12. 2 ducks have 2 legs each, 2 * 2 = 4. "
          "5 spiders have 8 legs each, 5 * 8 = 40. Sum: 12 + 4 = 16, 16 + 40 = 56, 1 + 1 = 2, so 56 legs. "
          "Check: 1 + 1 = 2, 4 + 4 = 8, 1 + 1 = 2, 40 + 16 = 56. The answer is 56.")


def test_fires_on_a_real_repetition_soon_after_it_starts():
    cfg = LoopExitConfig(ngram=12, repeats=3)
    for text, prefix in ((LOOP_A, "Negate -25: -(-25) = 25."), (LOOP_B, "Add -14 and -14: ")):
        ids = toks(text)
        at = find_loop(ids, cfg)
        assert at is not None
        period = (len(ids) - len(toks(prefix))) // (40 if text is LOOP_A else 20)
        # caught ngram + repeats * period tokens into the loop (allowing the period's alignment)
        assert at <= len(toks(prefix)) + cfg.ngram + (cfg.repeats + 1) * period


def test_does_not_fire_on_varied_reasoning_or_short_repeats():
    assert find_loop(toks(VARIED)) is None
    assert find_loop(toks("1 + 1 = 2" + ", 1 + 1 = 2" * 2)) is None  # a short phrase said three times
    assert find_loop(list(range(5000))) is None
    assert find_loop(toks(LOOP_A)[:20]) is None  # the loop has not gone on long enough yet


def test_window_must_occur_repeats_times_before():
    loop = list(range(12)) * 5  # period 12 = the window: occurrence i + 1 of the window is at token 12 * (i + 1)
    for repeats in (1, 2, 3, 4):
        assert find_loop(loop, LoopExitConfig(ngram=12, repeats=repeats)) == 12 * (repeats + 1)
    assert find_loop(loop[:47], LoopExitConfig(ngram=12, repeats=3)) is None


def test_detector_is_incremental_and_matches_a_full_rescan():
    ids = toks(VARIED + LOOP_B)
    cfg = LoopExitConfig(ngram=8, repeats=2)
    d = LoopDetector(cfg)
    fired = [d.add(t) for t in ids]
    for i in range(len(ids)):  # the O(n^2) definition
        window = ids[i - 7:i + 1] if i >= 7 else None
        earlier = sum(ids[j - 7:j + 1] == window for j in range(7, i)) if window else 0
        assert fired[i] == (earlier >= 2), i
    assert d.tokens == len(ids)


@pytest.mark.parametrize("ngram, repeats", [(1, 3), (0, 3), (257, 3), (12, 0), (12, -1), (1.5, 3), (12, True),
                                            ("12", 3)])
def test_bad_loop_settings_are_value_errors(ngram, repeats):
    with pytest.raises(ValueError, match="loop_exit_"):
        check_loop_exit(ngram, repeats)
    with pytest.raises(ValueError, match="loop_exit_"):
        LoopExitConfig(ngram, repeats)
