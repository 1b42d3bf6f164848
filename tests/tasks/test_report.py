"""``llmopt report`` from saved runs: every figure is drawn and names its command and run."""

import json

import pytest

from llmopt.report.build import build_report
from llmopt.report.runs import load_runs
from llmopt.tasks import evaluate as ev
from llmopt.tasks.evaluate import EvalConfig, build_items, compare_runs, save_json, summarize


def _run(quant, right, command):
    """A saved eval run as run_eval writes it, from known outputs: the first ``right`` math
    items answered correctly in format, the rest wrong."""
    config = EvalConfig(quant=quant, suites=("math",), n=5, seed=2)
    items = build_items(config)["math"]
    outputs = {}
    for i, it in enumerate(items):
        text = (f"<think>ok</think><answer>{it.reference}</answer>" if i < right else "I do not know")
        outputs[ev._prompt_key(it, 0)] = {"output": text, "tokens": 20 + 10 * i,
                                          "latency_s": 1.0 + i, "ttft_s": 0.2,
                                          "finish_reason": "stop", "batch_size": 1}
    records = ev._generative_records("math", items, config, outputs, set(), None)
    return {"kind": ev.RUN_KIND, "version": 1, "command": command, "config": {"n": 5, "seed": 2},
            "model": {"name": "smollm2-135m-instruct", "quant": quant,
                      "bits_per_weight": ev.nominal_bits_per_weight(quant),
                      "bits_per_weight_source": "nominal"},
            "suites": summarize(records), "items": records}


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "runs"
    fp32 = _run(None, 4, "llmopt eval --suite math --n 5 --seed 2 --json runs/fp32.json")
    int4 = _run("int4", 2, "llmopt eval --suite math --n 5 --seed 2 --quant int4 --json runs/int4.json")
    save_json(fp32, d / "fp32.json")
    save_json(int4, d / "int4.json")
    save_json(compare_runs(int4, fp32), d / "cmp" / "compare.json")
    # the row shape `llmopt bench --json` writes (llmopt.bench.grid._rows)
    bench = {"kind": "llmopt-bench", "command": "llmopt bench --concurrency 1,2,4", "label": "engine",
             "rows": [{"concurrency": c, "input_len": 64, "output_len": 32, "backend": backend,
                       "output_tokens_per_s": speed * c ** 0.8, "ttft_p50_ms": 100.0 * c,
                       "ttft_p90_ms": 180.0 * c}
                      for c in (1, 2, 4) for backend, speed in (("llmopt", 20.0), ("transformers", 10.0))]}
    (d / "bench.json").write_text(json.dumps(bench))
    (d / "notes.json").write_text(json.dumps({"unrelated": True}))
    return d


def test_runs_are_recognized_by_kind(run_dir):
    runs = load_runs([run_dir])
    assert len(runs.evals) == 4  # two runs + the comparison's candidate and baseline
    assert len(runs.benches) == 1 and len(runs.comparisons) == 1
    assert [p.name for p in runs.skipped] == ["notes.json"]


def test_report_has_every_figure_with_its_command_and_run(run_dir, tmp_path):
    out = tmp_path / "report"
    files = build_report([run_dir], out, command="llmopt report runs -o report")
    assert sorted(p.name for p in files.figures) == [
        "accuracy_vs_bits.png", "latency_percentiles.png", "throughput_vs_concurrency.png",
        "tokens_per_answer.png"]
    for png in files.figures:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    md = files.markdown.read_text()
    sections = md.split("### ")
    for fig in files.figures:
        section = next(s for s in sections if f"figures/{fig.name}" in s)
        assert "Made from:" in section and "saved run `" in section and "command `llmopt " in section
    assert "llmopt bench --concurrency 1,2,4" in md
    assert "llmopt eval --suite math --n 5 --seed 2 --quant int4" in md
    # accuracy table: 4/5 and 2/5 with Wilson intervals
    assert "| math | 5 | accuracy | 0.800 |" in md and "| math | 5 | accuracy | 0.400 |" in md
    # the comparison's delta, -0.4, is reported
    assert "| math | accuracy | 0.400 | 0.800 | -0.400 |" in md
    html = files.html.read_text()
    assert html.count("<img ") == 4 and "<table>" in html


def test_missing_bench_run_is_said_not_drawn(tmp_path):
    save_json(_run(None, 1, "llmopt eval x"), tmp_path / "r" / "a.json")
    files = build_report([tmp_path / "r"], tmp_path / "out")
    md = files.markdown.read_text()
    assert "Not drawn: no bench run given." in md
    assert len(files.figures) == 3


def test_report_without_runs_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no eval, bench or training run"):
        build_report([tmp_path / "empty"], tmp_path / "out")
