"""``llmopt run`` with think budgets and early exit: options, the per-case field, the side file."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llmopt.batch import BatchFormatError, BatchRun, RunOptions, load_batch
from llmopt.reasoning.format import format_ok


def _cases(tmp_path, **extra):
    p = tmp_path / "cases.jsonl"
    rows = [{"id": "a", "max_tokens": 60, "questions": [{"id": 1, "content": "hi"}, {"id": 2, "content": "yo"}],
             **extra}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.mark.parametrize("kw", [dict(think_budget=0), dict(think_budget=-5), dict(early_exit_threshold=0.0),
                                dict(early_exit_threshold=1.01), dict(loop_exit="yes"),
                                dict(answer_budget=0), dict(think_budget_threshold=0.9),
                                dict(think_budget=8, think_budget_threshold=0.9, think_budget_max=4),
                                dict(jump_forward="yes"), dict(low_confidence_exit=1.0),
                                dict(low_confidence_exit=0.0), dict(think_gate=0),
                                dict(think_gate=8, think_gate_threshold=1.0), dict(difficulty_exit=1.0),
                                dict(difficulty_exit=0.9, difficulty_exit_tokens=0)])
def test_bad_reasoning_options_are_value_errors(kw):
    with pytest.raises(ValueError):
        RunOptions(**kw)


def test_case_think_budget_is_validated_and_wins_over_the_run_option(tmp_path):
    with pytest.raises(BatchFormatError, match="think_budget: must be an integer >= 1"):
        load_batch(_cases(tmp_path, think_budget=0))
    batch = load_batch(_cases(tmp_path, think_budget=9))
    run = BatchRun(batch, tmp_path / "out.jsonl", RunOptions(think_budget=100, early_exit=True))
    p = run.params(batch.cases[0])
    assert p.think_budget == 9 and p.early_exit and not p.loop_exit and p.answer_budget is None
    assert BatchRun(batch, tmp_path / "out.jsonl", RunOptions(answer_budget=24)).params(batch.cases[0]).answer_budget == 24
    assert BatchRun(batch, tmp_path / "out.jsonl", RunOptions(loop_exit=True)).params(batch.cases[0]).loop_exit
    lc = BatchRun(batch, tmp_path / "out.jsonl", RunOptions(low_confidence_exit=0.3)).params(batch.cases[0])
    assert lc.low_confidence_exit == 0.3
    tg = BatchRun(batch, tmp_path / "out.jsonl", RunOptions(think_gate=24, think_gate_threshold=0.8)).params(batch.cases[0])
    assert (tg.think_gate, tg.think_gate_threshold) == (24, 0.8)
    de = BatchRun(batch, tmp_path / "out.jsonl", RunOptions(difficulty_exit=0.9, difficulty_exit_tokens=12)).params(
        batch.cases[0])
    assert (de.difficulty_exit, de.difficulty_exit_tokens) == (0.9, 12)
    gated = BatchRun(batch, tmp_path / "out.jsonl", RunOptions(think_budget=20, think_budget_threshold=0.9,
                                                              think_budget_max=40,
                                                              jump_forward=True)).params(batch.cases[0])
    assert (gated.think_budget, gated.think_budget_threshold, gated.think_budget_max, gated.jump_forward) == (
        9, 0.9, 40, True)


def test_cli_rejects_a_zero_think_budget(tmp_path):
    from llmopt.cli import app

    r = CliRunner().invoke(app, ["run", str(_cases(tmp_path)), "-o", str(tmp_path / "o.jsonl"), "--think-budget", "0"])
    assert r.exit_code != 0 and "think-budget" in r.output


def test_budgeted_run_keeps_the_format_and_writes_a_reasoning_side_file(tiny_models, tmp_path):
    from llmopt.config import EngineConfig
    from llmopt.engine.engine import LLMEngine

    engine = LLMEngine(str(tiny_models["llama"][1]), EngineConfig(num_threads=1, kv_cache_memory_gb=0.05))
    out = tmp_path / "out.jsonl"
    # the system prompt ends with <think> and the chat template adds the assistant turn after it, so the
    # tiny model is not inside <think>: the budget does nothing, the side file still records the split
    opts = RunOptions(system="", think_budget=10, max_tokens=60)
    BatchRun(load_batch(_cases(tmp_path)), out, opts, resume=False).run(engine)
    line = json.loads(out.read_text())
    assert set(line["result"]) == {"results", "duration"}  # the competition object is untouched
    side = [json.loads(x) for x in (tmp_path / "out.jsonl.reasoning.jsonl").read_text().splitlines()]
    assert [q["id"] for q in side[0]["questions"]] == [1, 2] and side[0]["id"] == "a"
    for q, r in zip(side[0]["questions"], line["result"]["results"]):
        assert q["think_tokens"] + q["answer_tokens"] == q["output_tokens"] and q["jct_ms"] > 0
        assert q["closed_by"] in (None, "budget") and (q["closed_by"] is None or format_ok(r["content"]))


def test_cli_difficulty_exit_runs_with_a_probe_file_and_records_its_estimate(tiny_models, tmp_path):
    """``llmopt run --difficulty-exit --difficulty-probe``: the probe is loaded, every question judged (its
    P(wrong) in the side file); a missing probe file is an error before any work."""
    import torch

    from llmopt.cli import app
    from llmopt.config import EngineConfig
    from llmopt.engine.engine import LLMEngine
    from llmopt.reasoning.difficulty import DifficultyProbe

    model = str(tiny_models["llama"][1])
    h = LLMEngine(model, EngineConfig(num_threads=1, kv_cache_memory_gb=0.05)).model_config.hidden_size
    probe = DifficultyProbe(torch.zeros(h), 2.0).save(tmp_path / "p.safetensors")
    out = tmp_path / "o.jsonl"
    args = ["run", str(_cases(tmp_path)), "-o", str(out), "--model", model, "--threads", "1", "--system", "",
            "--difficulty-exit", "0.5", "--difficulty-exit-tokens", "3", "--speculative", "off"]
    r = CliRunner().invoke(app, args + ["--difficulty-probe", str(tmp_path / "missing.safetensors")])
    assert r.exit_code != 0 and "does not exist" in r.output and not out.exists()
    r = CliRunner().invoke(app, args + ["--difficulty-probe", str(probe)])
    assert r.exit_code == 0, r.output
    side = [json.loads(x) for x in (tmp_path / "o.jsonl.reasoning.jsonl").read_text().splitlines()]
    assert [q["p_wrong"] for q in side[0]["questions"]] == [0.8808, 0.8808]  # sigmoid(2)
