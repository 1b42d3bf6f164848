"""Long-context suites: haystack building (lengths, depths, determinism), strict grading, and the
harness end to end on a tiny random model (fast: short lengths)."""

import re

import pytest

from llmopt.config import EngineConfig
from llmopt.models.tokenizer import Tokenizer
from llmopt.tasks.evaluate import EvalConfig, build_items, run_eval, summarize
from llmopt.tasks.longctx import (
    ANSWER_TOKENS,
    LongPerplexitySuite,
    RetrievalSuite,
    grade_first_number,
    haystack_paragraphs,
)
from tests.conftest import hf_tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(hf_tokenizer())


def test_haystack_comes_from_stdlib_docstrings_in_a_fixed_order():
    a, b = haystack_paragraphs(), haystack_paragraphs()
    assert a == b and len(a) > 500
    assert all(len(p) >= 80 and "\n" not in p for p in a)


@pytest.mark.parametrize("name", ["passkey", "needle"])
def test_prompts_have_the_asked_length_and_the_needle_at_the_asked_depth(tok, name):
    suite = RetrievalSuite(name, tok, lengths=(800, 1500), depths=(0.0, 0.5, 1.0))
    items = suite.items(2, seed=3)
    assert len(items) == 2 * 3 * 2
    for it in items:
        target = it.payload["length"] - ANSWER_TOKENS
        assert target - 8 <= it.payload["prompt_tokens"] <= target, (it.id, it.payload)
        content = it.messages[0]["content"]
        assert it.reference in content
        # where the needle sits in the filler (between the intro and the question), as a fraction of it
        filler = content[content.index("\n\n") + 2:content.rindex("\n\n")]
        k = it.reference
        needle = re.search(rf"The secret number is {k}\. Remember it\. {k} is the secret number\.|"
                           rf"One of the special magic numbers for \w+ is: {k}\.", filler)
        assert needle is not None
        frac = needle.start() / (len(filler) - len(needle.group(0)))
        assert abs(frac - it.payload["depth"]) < 0.1, (it.id, frac)
    assert [i.messages for i in suite.items(2, seed=3)] == [i.messages for i in items]
    assert [i.reference for i in suite.items(2, seed=4)] != [i.reference for i in items]


def test_retrieval_grading_is_strict_about_the_first_number():
    assert grade_first_number("71432", "71432").correct
    assert grade_first_number("71432", "The pass key is 71432.").correct
    assert not grade_first_number("71432", "714321").correct
    assert not grade_first_number("71432", "It is 1, no: 71432").correct
    assert not grade_first_number("71432", "I do not know").correct
    assert not grade_first_number("71432", "7143").correct


def test_bad_lengths_and_depths_are_refused_with_a_reason(tok):
    with pytest.raises(ValueError, match="depths"):
        RetrievalSuite("passkey", tok, lengths=(512,), depths=(1.5,))
    with pytest.raises(ValueError, match="lengths must exceed"):
        RetrievalSuite("passkey", tok, lengths=(40,))
    with pytest.raises(ValueError, match="windows"):
        LongPerplexitySuite(tok, tokens=10**7).items(1, seed=0)


def test_long_ppl_windows_are_consecutive_and_seeded(tok):
    suite = LongPerplexitySuite(tok, tokens=500)
    a, b = suite.items(3, seed=0), suite.items(3, seed=1)
    assert [len(i.payload["ids"]) for i in a] == [500] * 3
    assert a[0].payload["ids"] != b[0].payload["ids"]


def test_summary_counts_cells_and_ci():
    recs = [{"suite": "passkey", "id": f"x{i}", "length": 1024 if i < 4 else 2048, "depth": 0.5,
             "prompt_tokens": 1000, "correct": i % 2 == 0, "tokens": 3, "latency_s": 1.0, "kv_tokens": 250}
            for i in range(8)]
    s = summarize(recs)["passkey"]
    assert s["n"] == 8 and s["accuracy"] == 0.5
    assert s["cells"] == [{"length": 1024, "depth": 0.5, "n": 4, "accuracy": 0.5},
                          {"length": 2048, "depth": 0.5, "n": 4, "accuracy": 0.5}]
    assert s["mean_kv_fraction"] == 0.25
    assert 0 < s["accuracy_ci95"][0] < 0.5 < s["accuracy_ci95"][1] < 1


def test_eval_runs_the_long_suites_on_a_tiny_model(tiny_models):
    from llmopt import LLM

    llm = LLM(str(tiny_models["llama"][1]), kv_cache_memory_gb=0.05)
    cfg = EvalConfig(suites=("passkey", "needle", "longppl"), n=1, long_lengths=(600,), long_depths=(0.0, 1.0),
                     long_ppl_tokens=128)
    with pytest.raises(ValueError, match="tokenizer"):
        build_items(cfg)
    run = run_eval(llm, cfg)
    assert run["suites"]["passkey"]["n"] == 2 and run["suites"]["needle"]["n"] == 2
    assert run["suites"]["longppl"]["tokens"] == 127
    kv = run["kv_cache"]
    c = llm.engine.model_config
    assert kv["bytes_per_token"] == 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4
    rec = [r for r in run["items"] if r["suite"] == "passkey"][0]
    assert rec["tokens"] >= 1 and 600 - ANSWER_TOKENS - 8 <= rec["prompt_tokens"] <= 600 - ANSWER_TOKENS


def test_long_context_options_parse_and_reach_the_engine_config():
    from llmopt.tasks.evaluate import engine_kwargs, parse_numbers

    assert parse_numbers("1024, 2048", int, "--long-lengths") == (1024, 2048)
    with pytest.raises(ValueError, match="--long-depths takes comma-separated numbers"):
        parse_numbers("0,half", float, "--long-depths")
    cfg = EvalConfig(suites=("passkey",), kv_policy="snapkv", kv_budget=0.25, kv_dtype="int8")
    assert engine_kwargs(cfg) == {"kv_policy": "snapkv", "kv_budget": 0.25, "kv_dtype": "int8", "kv_quest_pin": 0.0,
                                  "speculative": None, "difficulty_probe": None}
    cfg = EvalConfig(suites=("passkey",), kv_policy="quest", kv_budget=0.25, kv_quest_pin=0.25)
    assert EngineConfig(**engine_kwargs(cfg)).kv_quest_pin == 0.25  # --kv-quest-pin reaches the engine


def test_haystack_does_not_depend_on_what_the_process_imported_or_patched(monkeypatch):
    """The filler comes from the modules' source files: a library that adds a documented class to
    a stdlib module (as some do at import) must not change the eval items."""
    import json

    from llmopt.tasks.longctx import haystack_paragraphs

    before = haystack_paragraphs()

    class Added:
        """A class some other library attached to the json module at import time, with a docstring
        long enough to be taken as a filler paragraph if live module objects were read."""

    Added.__module__ = "json"
    monkeypatch.setattr(json, "Added", Added, raising=False)
    assert haystack_paragraphs() == before
