"""``llmopt eval`` records reasoning efficiency: think / answer tokens, JCT, budget closes."""

from __future__ import annotations

import pytest

from llmopt import LLM
from llmopt.tasks.evaluate import EvalConfig, reasoning_summary, run_eval


def test_bad_think_budget_in_eval_config_is_a_value_error():
    with pytest.raises(ValueError, match="think_budget"):
        EvalConfig(think_budget=0)
    with pytest.raises(ValueError, match="early_exit_threshold"):
        EvalConfig(early_exit=True, early_exit_threshold=2.0)


def test_budgeted_eval_records_think_tokens_and_keeps_the_format(tiny_models):
    llm = LLM(str(tiny_models["llama"][1]), kv_cache_memory_gb=0.05)
    cfg = EvalConfig(model="tiny", suites=("math",), n=2, max_tokens=80, think_budget=8, prefill_think=True)
    run = run_eval(llm, cfg, command="test")
    for r in run["items"]:
        assert r["output"].startswith("<think>\n") and r["closed_by"] == "budget"
        assert r["think_tokens"] == 8 and r["think_tokens"] + r["answer_tokens"] == r["tokens"]
        assert r["format_ok"], r["output"]
    s = run["suites"]["math"]
    assert s["mean_think_tokens"] == 8 and s["budget_close_rate"] == 1.0 and s["early_exit_rate"] == 0.0
    assert s["accuracy_per_1k_think_tokens"] == 1000 * sum(r["correct"] for r in run["items"]) / 16


def test_loop_exit_eval_closes_looping_think_parts_and_keeps_the_format(tiny_models):
    llm = LLM(str(tiny_models["llama"][1]), kv_cache_memory_gb=0.05)
    cfg = EvalConfig(model="tiny", suites=("math",), n=2, max_tokens=200, loop_exit=True, prefill_think=True)
    run = run_eval(llm, cfg, command="test")
    for r in run["items"]:  # the random model loops greedily; the engine closes the think part for it
        assert r["closed_by"] in ("loop", "budget") and r["format_ok"], r["output"]
    s = run["suites"]["math"]
    assert s["loop_exit_rate"] == sum(r["closed_by"] == "loop" for r in run["items"]) / 2 > 0


def test_low_confidence_exit_eval_closes_guessing_think_parts(tiny_models):
    llm = LLM(str(tiny_models["llama"][1]), kv_cache_memory_gb=0.05)
    # the random model's tokens are all guesses: at 0.99 thinking closes in place of the first one
    cfg = EvalConfig(model="tiny", suites=("math",), n=2, max_tokens=40, low_confidence_exit=0.99, answer_budget=8,
                     prefill_think=True)
    run = run_eval(llm, cfg, command="test")
    for r in run["items"]:
        assert r["closed_by"] == "low_confidence" and r["think_tokens"] == 0 and r["format_ok"], r["output"]
    assert run["suites"]["math"]["low_confidence_exit_rate"] == 1.0


def test_think_gate_eval_closes_unsure_think_parts(tiny_models):
    llm = LLM(str(tiny_models["llama"][1]), kv_cache_memory_gb=0.05)
    # the random model is unsure of every token: a 2-token gate at 0.99 closes in place of the second one
    cfg = EvalConfig(model="tiny", suites=("math",), n=2, max_tokens=40, think_gate=2, think_gate_threshold=0.99,
                     answer_budget=8, prefill_think=True)
    run = run_eval(llm, cfg, command="test")
    for r in run["items"]:
        assert r["closed_by"] == "think_gate" and r["think_tokens"] == 1 and r["format_ok"], r["output"]
    assert run["suites"]["math"]["think_gate_exit_rate"] == 1.0


def test_difficulty_exit_eval_closes_thinking_of_items_judged_hard(tiny_models, tmp_path):
    import torch

    from llmopt.reasoning.difficulty import DifficultyProbe
    from llmopt.tasks.evaluate import engine_kwargs

    h = LLM(str(tiny_models["llama"][1]), kv_cache_memory_gb=0.05).engine.model_config.hidden_size
    probe = DifficultyProbe(torch.zeros(h), 3.0).save(tmp_path / "p.safetensors")  # P(wrong) 0.95 for all
    cfg = EvalConfig(model="tiny", suites=("math",), n=2, max_tokens=40, difficulty_exit=0.9, difficulty_exit_tokens=3,
                     difficulty_probe=str(probe), answer_budget=8, prefill_think=True)
    assert engine_kwargs(cfg)["difficulty_probe"] == str(probe)
    llm = LLM(str(tiny_models["llama"][1]), kv_cache_memory_gb=0.05, difficulty_probe=str(probe))
    run = run_eval(llm, cfg, command="test")
    for r in run["items"]:
        assert r["closed_by"] == "difficulty" and r["think_tokens"] == 2 and r["format_ok"], r["output"]
    assert run["suites"]["math"]["difficulty_exit_rate"] == 1.0


def test_reasoning_summary_counts_correct_answers_per_thousand_think_tokens():
    rs = [{"think_tokens": 300, "answer_tokens": 5, "correct": True, "latency_s": 1.0, "closed_by": "early_exit"},
          {"think_tokens": 200, "answer_tokens": 7, "correct": False, "latency_s": 3.0, "closed_by": "model"}]
    s = reasoning_summary(rs)
    assert s["accuracy_per_1k_think_tokens"] == 2.0 and s["mean_jct_s"] == 2.0 and s["early_exit_rate"] == 0.5


def _reasoning_run(budget, right, think):
    from llmopt.tasks import evaluate as ev
    from llmopt.tasks.evaluate import build_items, summarize

    config = EvalConfig(suites=("math",), n=4, seed=2, think_budget=budget)
    items = build_items(config)["math"]
    outputs = {ev._prompt_key(it, 0): {
        "output": f"<think>ok</think><answer>{it.reference if i < right else 'no'}</answer>", "tokens": think + 5,
        "latency_s": think / 20, "ttft_s": 0.1, "finish_reason": "stop", "batch_size": 1, "think_tokens": think,
        "answer_tokens": 5, "closed_by": "budget" if budget else "model", "early_exit_at": None, "probes": 0,
        "probe_tokens": 0} for i, it in enumerate(items)}
    records = ev._generative_records("math", items, config, outputs, set(), None)
    return {"kind": ev.RUN_KIND, "version": 1, "command": f"llmopt eval --think-budget {budget}",
            "config": {"n": 4, "seed": 2, "think_budget": budget}, "model": {"name": "m", "quant": None},
            "suites": summarize(records), "items": records}


def test_report_draws_accuracy_against_jct_with_the_unlimited_reference(tmp_path):
    from llmopt.report.build import build_report
    from llmopt.report.plots import reasoning_setting
    from llmopt.report.runs import load_runs
    from llmopt.tasks.evaluate import save_json

    save_json(_reasoning_run(None, 3, 200), tmp_path / "runs" / "unlimited.json")
    save_json(_reasoning_run(64, 2, 64), tmp_path / "runs" / "b64.json")
    low = _reasoning_run(None, 2, 80)
    low["config"] |= {"low_confidence_exit": 0.4, "loop_exit": True}
    save_json(low, tmp_path / "runs" / "low.json")
    gate = _reasoning_run(128, 2, 60)
    gate["config"] |= {"think_gate": 24, "loop_exit": True}
    save_json(gate, tmp_path / "runs" / "gate.json")
    hard = _reasoning_run(128, 2, 50)
    hard["config"] |= {"think_gate": 24, "loop_exit": True, "difficulty_exit": 0.95}
    save_json(hard, tmp_path / "runs" / "hard.json")
    runs = load_runs([tmp_path / "runs"])
    assert sorted(reasoning_setting(r) for r in runs.evals) == [
        "budget 128, loop exit, think gate 24@default", "budget 128, loop exit, think gate 24@default, difficulty 0.95@default",
        "budget 64", "loop exit, low confidence 0.4", "unlimited"]
    files = build_report([tmp_path / "runs"], tmp_path / "out")
    assert "accuracy_vs_jct.png" in [p.name for p in files.figures]
    assert "llmopt eval --think-budget 64" in files.markdown.read_text()
