"""``llmopt run``: both competition output shapes, resume, input validation and the case duration.

The runs use the real embedded model (no mocks) with 2-3 questions and a few new tokens each, on one
thread so that the suite stays light on a shared machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmopt.batch import BatchFormatError, BatchRun, RunOptions, load_batch
from llmopt.batch.runner import DEFAULT_SYSTEM_PROMPT, messages_for
from tests.conftest import SMOLLM2, requires_smollm2

FAST = RunOptions(max_tokens=8, concurrency=2)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def case(cid, qids, concurrency=2, max_tokens=8, **extra) -> dict:
    qs = [{"id": q, "content": f"What is {i + 2} + {i + 3}?"} for i, q in enumerate(qids)]
    return {"id": cid, "concurrency": concurrency, "max_tokens": max_tokens, "questions": qs, **extra}


@pytest.fixture(scope="module")
def engine():
    from llmopt.config import EngineConfig
    from llmopt.engine.engine import LLMEngine

    return LLMEngine(SMOLLM2, EngineConfig(num_threads=1))


# ---- input validation (no model needed) ------------------------------------------------------------

@pytest.mark.parametrize("lines, message", [
    ([case("a", [1]), case("b", [2]), '{"id": "c", "questions": [}'], "line 3: invalid JSON"),
    ([case("a", [1]), {"id": "b", "questions": [{"id": 2}]}], "line 2, questions[0].content: missing"),
    ([case("a", [1]), {"id": "b", "questions": [{"id": 2, "content": 7}]}],
     "line 2, questions[0].content: must be a non-empty string, got 7"),
    ([case("a", [1]), case("b", [1.5])], "line 2, questions[0].id: must be a non-empty string or an integer"),
    ([case("a", [1], concurrency=0)], "line 1, concurrency: must be an integer >= 1, got 0"),
    ([case("a", [1], concurrency=True)], "line 1, concurrency: must be an integer >= 1, got true"),
    ([case("a", [1], max_tokens="16")], 'line 1, max_tokens: must be an integer >= 1, got "16"'),
    ([{**case("a", [1]), "concurency": 2}], "line 1, concurency: unknown field in a test case"),
    ([case("a", [1]), case("a", [2])], 'line 2, id: duplicate test case id "a"'),
    ([case("a", [1, 1])], "line 1, questions[1].id: duplicate question id 1"),
    ([case("a", [1]), {"id": 5, "content": "hi"}], "line 2: expected one of the file's test cases"),
    ([{"id": "a", "questions": []}], "line 1, questions: must be a non-empty list"),
])
def test_malformed_jsonl_is_rejected_with_line_and_field(tmp_path, lines, message):
    p = tmp_path / "cases.jsonl"
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    with pytest.raises(BatchFormatError) as e:
        load_batch(p)
    assert f"{p} {message}" in str(e.value)


def test_blank_lines_count_in_line_numbers(tmp_path):
    p = tmp_path / "cases.jsonl"
    p.write_text(json.dumps(case("a", [1])) + "\n\n" + json.dumps({"id": "b", "questions": [{"id": 1}]}) + "\n")
    with pytest.raises(BatchFormatError, match=r"line 3, questions\[0\]\.content: missing"):
        load_batch(p)


@pytest.mark.parametrize("doc, message", [
    ([{"id": 1, "content": "x"}, {"id": 2, "content": ""}], ', [1].content: must be a non-empty string, got ""'),
    ({"questions": [{"id": 1, "content": "x"}], "max_tokens": 0}, ", max_tokens: must be an integer >= 1"),
    ({"cases": [{"id": 1, "content": "x"}]}, ", cases[0]: expected one of the file's test cases"),
    ({"questions": [{"id": 1, "content": "x"}], "cases": []}, ": the top-level object needs exactly one of 'cases'"),
    ([{"id": 1, "content": "x"}, {"id": 1, "content": "y"}], ", [1].id: duplicate question id 1"),
])
def test_malformed_json_is_rejected_with_path(tmp_path, doc, message):
    p = tmp_path / "questions.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(BatchFormatError) as e:
        load_batch(p)
    assert f"{p}{message}" in str(e.value)


def test_bad_json_document_names_its_line(tmp_path):
    p = tmp_path / "questions.json"
    p.write_text('[\n  {"id": 1, "content": "x"},\n  {"id": 2 "content": "y"}\n]\n')
    with pytest.raises(BatchFormatError, match=r"questions\.json line 3: invalid JSON"):
        load_batch(p)


def test_shipped_examples_are_valid():
    root = Path(__file__).parents[2] / "examples"
    cases = load_batch(root / "cases.jsonl")
    assert cases.kind == "cases" and len(cases.cases) == 4
    assert {c.concurrency for c in cases.cases} == {1, 2, 4}
    assert all(64 <= c.max_tokens <= 256 for c in cases.cases)
    flat = load_batch(root / "questions.json")
    assert flat.kind == "questions" and flat.num_questions >= 3


def test_system_prompt_falls_back_from_question_to_case_to_file_to_default():
    from llmopt.batch.cases import Question

    q = Question(1, "hi")
    assert messages_for(q, None, None, DEFAULT_SYSTEM_PROMPT)[0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    assert messages_for(q, None, "file", "default")[0]["content"] == "file"
    assert messages_for(q, "case", "file", "default")[0]["content"] == "case"
    assert messages_for(Question(1, "hi", "own"), "case", "file", "default")[0]["content"] == "own"
    assert messages_for(q, "", "file", "default") == [{"role": "user", "content": "hi"}]  # "" = none


def test_cli_reports_bad_input_as_one_line_and_exit_1(tmp_path):
    from llmopt.cli import app

    p = write_jsonl(tmp_path / "cases.jsonl", [case("a", [1], concurrency=0)])
    r = CliRunner().invoke(app, ["run", str(p), "-o", str(tmp_path / "out.jsonl")])
    assert r.exit_code == 1
    assert "line 1, concurrency: must be an integer >= 1" in r.output
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_refuses_a_quest_pin_without_quest_before_loading(tmp_path):
    from llmopt.cli import app

    p = write_jsonl(tmp_path / "cases.jsonl", [case("a", [1])])
    r = CliRunner().invoke(app, ["run", str(p), "-o", str(tmp_path / "out.jsonl"), "--kv-quest-pin", "0.25",
                                 "--model", str(tmp_path / "missing.gguf")])
    assert r.exit_code == 1 and "needs kv_policy='quest'" in r.output, r.output
    assert not (tmp_path / "out.jsonl").exists()


# ---- runs with the real model --------------------------------------------------------------------

def assert_results(results: list, ids: list) -> None:
    assert isinstance(results, list) and [r["id"] for r in results] == ids
    for r, want in zip(results, ids):
        assert set(r) == {"id", "content"} and isinstance(r["content"], str) and r["content"]
        assert type(r["id"]) is type(want)  # 1 stays an int, "1" a string


@requires_smollm2
def test_case_mode_writes_one_competition_object_per_case(engine, tmp_path):
    p = write_jsonl(tmp_path / "cases.jsonl", [case("c-1", ["q1", 2], concurrency=1), case(7, [3, "4", "q5"])])
    out = tmp_path / "out" / "results.jsonl"
    summary = BatchRun(load_batch(p), out, FAST).run(engine)
    lines = read_jsonl(out)
    assert [x["id"] for x in lines] == ["c-1", 7]
    for line, ids in zip(lines, [["q1", 2], [3, "4", "q5"]]):
        assert set(line) == {"id", "result"} and set(line["result"]) == {"results", "duration"}
        assert_results(line["result"]["results"], ids)
        d = line["result"]["duration"]
        assert isinstance(d, float) and 0 < d < 600_000  # milliseconds, not seconds
    assert [c.duration_ms for c in summary.cases] == [x["result"]["duration"] for x in lines]
    assert summary.questions == 5 and summary.output_tokens > 0 and summary.tokens_per_s > 0


@requires_smollm2
def test_flat_mode_writes_one_result_object(engine, tmp_path):
    p = tmp_path / "questions.json"
    p.write_text(json.dumps([{"id": "a", "content": "What is 2 + 2?"}, {"id": 2, "content": "Name a colour."},
                             {"id": "3", "content": "What is 5 - 1?"}]))
    out = tmp_path / "results.json"
    BatchRun(load_batch(p), out, FAST).run(engine)
    doc = json.loads(out.read_text())
    assert set(doc) == {"result"} and set(doc["result"]) == {"results"}
    assert_results(doc["result"]["results"], ["a", 2, "3"])
    assert not (tmp_path / "results.json.partial.jsonl").exists()


@requires_smollm2
def test_case_concurrency_bounds_the_requests_in_flight(engine, tmp_path):
    p = write_jsonl(tmp_path / "cases.jsonl", [case("one", [1, 2, 3], concurrency=1),
                                               case("two", [1, 2, 3], concurrency=2)])
    summary = BatchRun(load_batch(p), tmp_path / "out.jsonl", RunOptions(max_tokens=6)).run(engine)

    def most_in_flight(outputs) -> int:
        events = sorted([(o.metrics.arrival_time, 1) for o in outputs] + [(o.metrics.finish_time, -1) for o in outputs])
        level = peak = 0
        for _, step in events:  # a finish sorts before an arrival at the same instant
            level += step
            peak = max(peak, level)
        return peak

    assert [most_in_flight(c.outputs) for c in summary.cases] == [1, 2]


@requires_smollm2
def test_resume_skips_cases_already_in_out(engine, tmp_path):
    p = write_jsonl(tmp_path / "cases.jsonl", [case("a", [1, 2]), case("b", [3, 4]), case("c", ["x", "y"])])
    out = tmp_path / "results.jsonl"

    class Interrupt(Exception):
        pass

    def stop_after_first(res):
        raise Interrupt

    with pytest.raises(Interrupt):  # the run stops right after case "a" is written
        BatchRun(load_batch(p), out, FAST).run(engine, on_case=stop_after_first)
    first = out.read_text()
    assert [x["id"] for x in read_jsonl(out)] == ["a"]
    with out.open("a") as f:  # and the process died in the middle of the next line
        f.write('{"id": "b", "result": {"resu')

    run = BatchRun(load_batch(p), out, FAST)
    assert run.pending_questions == 4
    tokens_before = engine.stats["generated_tokens"]
    computed: list = []
    summary = run.run(engine, on_answer=lambda c, o: computed.append((c.id, o.request_id)))
    assert sorted({cid for cid, _ in computed}) == ["b", "c"]  # case "a" was not recomputed
    assert engine.stats["generated_tokens"] - tokens_before == summary.output_tokens
    lines = out.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a", "b", "c"]
    assert lines[0] + "\n" == first  # byte for byte, its duration included
    assert [c.resumed for c in summary.cases] == [True, False, False]

    again = BatchRun(load_batch(p), out, FAST)  # complete: nothing left
    assert again.pending_questions == 0
    again.run(engine=None)
    assert out.read_text().splitlines() == lines


@requires_smollm2
def test_resume_redoes_a_case_whose_questions_changed_and_rejects_a_foreign_out(engine, tmp_path):
    out = tmp_path / "results.jsonl"
    write_jsonl(out, [{"id": "a", "result": {"results": [{"id": 1, "content": "old"}], "duration": 1.0}}])
    p = write_jsonl(tmp_path / "cases.jsonl", [case("a", [1, 2])])
    assert BatchRun(load_batch(p), out, FAST).pending_questions == 2
    other = write_jsonl(tmp_path / "other.jsonl", [case("z", [1])])
    with pytest.raises(ValueError, match="holds test case 'a', which is not in"):
        BatchRun(load_batch(other), out, FAST)
    assert BatchRun(load_batch(other), out, FAST, resume=False).pending_questions == 1


@requires_smollm2
def test_flat_mode_resumes_from_the_partial_file(engine, tmp_path):
    p = tmp_path / "questions.jsonl"
    write_jsonl(p, [{"id": 1, "content": "What is 2 + 2?"}, {"id": "b", "content": "What is 3 + 3?"}])
    out = tmp_path / "results.json"
    partial = tmp_path / "results.json.partial.jsonl"
    write_jsonl(partial, [{"id": 1, "content": "kept from before"}])
    run = BatchRun(load_batch(p), out, FAST)
    assert run.pending_questions == 1
    summary = run.run(engine)
    results = json.loads(out.read_text())["result"]["results"]
    assert results[0] == {"id": 1, "content": "kept from before"} and results[1]["id"] == "b"
    assert summary.resumed_questions == 1 and summary.questions == 1
    assert not partial.exists()


@requires_smollm2
def test_duration_measures_the_case(engine, tmp_path):
    long_q = {"id": 1, "content": "Write a long story about a dragon who learns to bake bread."}
    p = write_jsonl(tmp_path / "cases.jsonl", [{"id": "short", "concurrency": 1, "max_tokens": 1, "questions": [long_q]},
                                               {"id": "long", "concurrency": 1, "max_tokens": 16, "questions": [long_q]}])
    summary = BatchRun(load_batch(p), tmp_path / "out.jsonl", RunOptions(stop_at_answer=False)).run(engine)
    short, long = summary.cases
    assert short.output_tokens == 1 and long.output_tokens > 8
    assert long.duration_ms > short.duration_ms
    for c in summary.cases:  # the case's wall time covers its requests from arrival to finish
        o = c.outputs[0]
        assert c.duration_ms >= 1000 * (o.metrics.finish_time - o.metrics.arrival_time)


def test_cli_with_everything_already_done_needs_no_model(tmp_path):
    from llmopt.cli import app

    p = write_jsonl(tmp_path / "cases.jsonl", [case("a", [1])])
    out = write_jsonl(tmp_path / "out.jsonl",
                      [{"id": "a", "result": {"results": [{"id": 1, "content": "5"}], "duration": 12.5}}])
    r = CliRunner().invoke(app, ["run", str(p), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "1 / 0 / 1" not in r.output and "0 / 1 / 1" in r.output and "not needed" in r.output


# ---- output path checked before the model loads ----------------------------------------------------

@pytest.mark.parametrize("make_out, message", [
    (lambda d: d, "is a directory; give a file path such as"),
    (lambda d: d / "a-file.txt" / "out.jsonl", "a-file.txt is a file, not a directory"),
    (lambda d: d / "a-file.txt" / "deeper" / "out.jsonl", "a-file.txt is a file, not a directory"),
])
def test_cli_rejects_an_unwritable_output_path_before_loading_the_model(tmp_path, make_out, message):
    from llmopt.cli import app

    p = write_jsonl(tmp_path / "cases.jsonl", [case("a", [1])])
    (tmp_path / "a-file.txt").write_text("not a directory")
    out = make_out(tmp_path)
    # a model that cannot load: had the CLI loaded it first, its error would be the one reported
    r = CliRunner().invoke(app, ["run", str(p), "-o", str(out), "--model", str(tmp_path / "missing.gguf")])
    assert r.exit_code == 1, r.output
    assert message in r.output and "missing.gguf" not in r.output
    assert "Traceback" not in r.output
    assert (tmp_path / "a-file.txt").read_text() == "not a directory"


@requires_smollm2
def test_a_fresh_engine_is_warmed_before_the_first_case_is_timed(tmp_path):
    from llmopt.config import EngineConfig
    from llmopt.engine.engine import LLMEngine
    from llmopt.kernels import build

    engine = LLMEngine(SMOLLM2, EngineConfig(num_threads=1))
    assert engine.stats["steps"] == 0
    p = write_jsonl(tmp_path / "cases.jsonl", [case("a", [1], max_tokens=2)])
    run = BatchRun(load_batch(p), tmp_path / "out.jsonl", FAST)
    seen: dict = {}

    def on_answer(c, out) -> None:
        seen.setdefault("cached", set(build._cache))

    summary = run.run(engine, on_answer=on_answer)
    assert run.warmup_s is not None and run.warmup_s > 0
    assert engine.stats["generated_tokens"] == 2 + summary.output_tokens  # warm-up's two tokens first
    if build.native_enabled() and build.cpu_has_avx2():
        assert set(build.EXTENSIONS) <= seen["cached"]
    again = BatchRun(load_batch(p), tmp_path / "again.jsonl", FAST)
    again.run(engine)
    assert again.warmup_s is None  # an engine that has run is warm: no second warm-up
