"""Item building, summaries, comparisons and specs of the eval harness, on known outputs.

The outputs here are strings written by the test (a right answer in format, a right answer
out of format, a wrong answer), run through the same record/grade/summary code a model's
outputs go through, so every expected number is known."""

import json
import math

import pytest

from llmopt.tasks import evaluate as ev
from llmopt.tasks.evaluate import EvalConfig, build_items, compare_runs, parse_spec, parse_suites, summarize


def _records(name, items, config, texts):
    outputs = {}
    for it, text in zip(items, texts):
        outputs[ev._prompt_key(it, 0)] = {"output": text, "tokens": len(text.split()),
                                          "latency_s": 0.5, "ttft_s": 0.1,
                                          "finish_reason": "stop", "batch_size": 1}
    return ev._generative_records(name, items, config, outputs, set(), None)


def _good(gold):
    return f"<think>\nworking\n</think>\n<answer>{gold}</answer>"


@pytest.fixture(scope="module")
def config():
    return EvalConfig(suites=("math", "code", "format"), n=6, seed=1, code_timeout_s=10.0)


@pytest.fixture(scope="module")
def items(config):
    return build_items(config)


def test_format_suite_mixes_the_generative_suites_items(items):
    fmt = items["format"]
    assert len(fmt) == 6
    assert [it.task for it in fmt[:3]] == ["basic_arithmetic", "syllogism", "humaneval"]
    assert all(it.suite == "format" for it in fmt)
    # the format items that math also holds are the same prompts (so generation is shared)
    math_prompts = [json.dumps(it.messages) for it in items["math"]]
    assert json.dumps(fmt[0].messages) in math_prompts


def test_build_items_is_deterministic(config, items):
    again = build_items(config)
    for name in items:
        assert [i.messages for i in items[name]] == [i.messages for i in again[name]]


def test_math_records_and_summary_count_exactly_the_right_answers(items, config):
    math_items = items["math"]
    golds = [it.reference for it in math_items]
    texts = [_good(golds[0]), _good(golds[1]), _good("-99999"),
             f"The answer is <answer>{golds[3]}</answer>",  # right answer, broken format
             "no idea", _good(golds[5])]
    recs = _records("math", math_items, config, texts)
    assert [r["correct"] for r in recs] == [True, True, False, False, False, True]
    assert [r["format_ok"] for r in recs] == [True, True, True, False, False, True]
    assert recs[3]["answer"] is None and recs[3]["answer_lenient"] == golds[3]
    assert recs[3]["correct_lenient"] is True
    for r in recs:
        for key in ("suite", "id", "prompt", "output", "answer", "correct", "tokens", "latency_s"):
            assert key in r
    s = summarize(recs)["math"]
    assert s["n"] == 6 and s["accuracy"] == pytest.approx(3 / 6)
    lo, hi = s["accuracy_ci95"]
    assert lo < 0.5 < hi
    assert s["format_rate"] == pytest.approx(4 / 6)
    assert s["accuracy_lenient"] == pytest.approx(4 / 6)


def test_code_records_are_graded_in_the_sandbox(items, config):
    code_items = items["code"][:2]
    texts = [_good(code_items[0].reference), _good("def nothing():\n    pass")]
    recs = _records("code", code_items, config, texts)
    assert [r["correct"] for r in recs] == [True, False]


def test_format_suite_scores_the_regex_only(items, config):
    fmt = items["format"][:4]
    texts = [_good("anything"), "<think>x</think><answer>y</answer>\n", "plain", _good("")]
    recs = _records("format", fmt, config, texts)
    assert [r["correct"] for r in recs] == [True, False, False, True]
    s = summarize(recs)["format"]
    assert s["score"] == 0.5 and "accuracy" not in s


def test_pass_at_k_summary_from_several_samples():
    recs = []
    for item, outcomes in (("a", [1, 0, 0, 0]), ("b", [0, 0, 0, 0]), ("c", [1, 1, 1, 1])):
        for k, ok in enumerate(outcomes):
            recs.append({"suite": "code", "id": item, "sample": k, "correct": bool(ok),
                         "correct_lenient": bool(ok), "format_ok": True, "score": float(ok),
                         "tokens": 10, "latency_s": 1.0})
    s = summarize(recs, samples=4)["code"]
    assert s["n"] == 3
    assert s["pass@1"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert s["pass@4"] == pytest.approx((1 + 0 + 1) / 3)


def test_ppl_summary_is_token_weighted():
    recs = [{"suite": "ppl", "id": "a", "sample": 0, "nll": 10 * math.log(4), "tokens": 10},
            {"suite": "ppl", "id": "b", "sample": 0, "nll": 30 * math.log(4), "tokens": 30}]
    s = summarize(recs)["ppl"]
    assert s["ppl"] == pytest.approx(4.0) and s["tokens"] == 40
    assert s["ppl_ci95"] == [pytest.approx(4.0), pytest.approx(4.0)]


def _run(records):
    return {"suites": summarize(records), "items": records, "command": "test"}


def test_compare_reports_paired_delta_and_mcnemar(items, config):
    math_items = items["math"]
    golds = [it.reference for it in math_items]
    cand = _records("math", math_items, config, [_good(g) for g in golds])
    base = _records("math", math_items, config, [_good(g) for g in golds[:2]] + ["x"] * 4)
    cmp = compare_runs(_run(cand), _run(base))
    d = cmp["deltas"]["math"]
    assert d["candidate"] == 1.0 and d["baseline"] == pytest.approx(2 / 6)
    assert d["delta"] == pytest.approx(4 / 6)
    assert d["delta_ci95"][0] > 0
    assert d["mcnemar"]["cand_only"] == 4 and d["mcnemar"]["base_only"] == 0
    assert d["mcnemar"]["p_value"] == pytest.approx(2 / 16)


def test_compare_refuses_different_items(items, config):
    math_items = items["math"]
    a = _records("math", math_items[:3], config, ["x"] * 3)
    b = _records("math", math_items[3:6], config, ["x"] * 3)
    with pytest.raises(ValueError, match="different items"):
        compare_runs(_run(a), _run(b))


def test_parse_spec_and_suites():
    assert parse_spec("fp32", "m") == ("m", "fp32")  # float, even for a GGUF file (None: its own blocks)
    assert parse_spec("none", "m") == ("m", None)
    assert parse_spec("int4", "m") == ("m", "int4")
    assert parse_spec("quant=int8", "m") == ("m", "int8")
    assert parse_spec("model=/x/y.gguf,quant=none", "m") == ("/x/y.gguf", None)
    with pytest.raises(ValueError):
        parse_spec("bits=4", "m")
    assert parse_suites("math, logic,math") == ("math", "logic")
    assert parse_suites("all") == ev.SUITE_NAMES
    with pytest.raises(ValueError, match="unknown suite"):
        EvalConfig(suites=parse_suites("math,poetry"))


def test_nominal_bits_per_weight():
    assert ev.nominal_bits_per_weight(None) == 32.0
    assert ev.nominal_bits_per_weight("int4") == 4.0
    assert ev.nominal_bits_per_weight("int8") == 8.0
    assert ev.nominal_bits_per_weight("q4_0") == 4.5
    assert ev.nominal_bits_per_weight("mystery") is None


def test_greedy_by_default_and_sampling_for_pass_at_k():
    assert EvalConfig().effective_temperature == 0.0
    assert EvalConfig(samples=4).effective_temperature == 0.8
    assert EvalConfig(samples=4, temperature=0.2).effective_temperature == 0.2
