"""The perplexity suite: its text source, and its grader on the real embedded model."""

import random

import pytest

from llmopt.tasks.ppl import PerplexitySuite, load_topics, score_text


def test_text_ships_with_python_and_items_are_a_seeded_sample():
    topics = load_topics()
    assert len(topics) >= 70
    assert "if" in topics and "statement" in topics["if"]
    suite = PerplexitySuite()
    a, b, c = suite.items(10, seed=0), suite.items(10, seed=0), suite.items(10, seed=1)
    assert [i.id for i in a] == [i.id for i in b] != [i.id for i in c]
    assert len({i.id for i in a}) == 10
    assert all(len(i.text) > 100 for i in a)
    with pytest.raises(ValueError, match="too many"):
        suite.items(len(topics) + 1, seed=0)


@pytest.fixture
def llm(real_llm):
    return real_llm


@pytest.mark.slow
def test_real_text_is_far_more_likely_than_the_same_tokens_shuffled(llm):
    text = load_topics()["if"]
    real = score_text(llm, text, max_tokens=64)
    ids = llm.tokenizer.encode(text)[:64]
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    scrambled = llm.tokenizer.decode(shuffled)
    fake = score_text(llm, scrambled, max_tokens=64)
    ppl_real = 2.718281828 ** (real.nll_sum / real.tokens)
    ppl_fake = 2.718281828 ** (fake.nll_sum / fake.tokens)
    assert real.tokens == 63
    assert 1.0 < ppl_real < 100.0, ppl_real
    assert ppl_fake > 5 * ppl_real, (ppl_real, ppl_fake)


@pytest.mark.slow
def test_score_rejects_text_too_short_to_score(llm):
    with pytest.raises(ValueError, match="at least 2"):
        score_text(llm, "a", max_tokens=1)
