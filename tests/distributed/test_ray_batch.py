"""``llmopt run --ray`` on a real local Ray cluster with the real embedded model: results equal to a
single-process greedy run, in input order; a worker killed mid-run (SIGKILL to its process) is
replaced and its case run again exactly once; resume; an unreachable address and a missing Ray fail
in seconds with a message that says what to do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmopt.batch import BatchRun, RunOptions, load_batch
from tests.conftest import SMOLLM2, requires_smollm2

pytestmark = requires_smollm2
ROOT = Path(__file__).resolve().parents[2]
OPTIONS = RunOptions(max_tokens=6, concurrency=2)
QUESTIONS = ["What is 2 + 3?", "Name a color.", "What is 7 * 6?", "Say hi.", "Name a fruit.", "What is 10 - 4?",
             "Name a planet.", "What is 3 + 3?"]


def write_cases(path: Path, n: int) -> Path:
    lines = []
    for i in range(n):
        qs = [{"id": j, "content": QUESTIONS[(i + j) % len(QUESTIONS)]} for j in range(1 + i % 2)]
        lines.append(json.dumps({"id": f"case-{i}", "concurrency": 2, "questions": qs}))
    path.write_text("\n".join(lines) + "\n")
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def answers(path: Path) -> list[tuple]:
    """(case id, its results) per line: the part a greedy rerun must reproduce (durations differ)."""
    return [(x["id"], x["result"]["results"]) for x in lines(path)]


@pytest.fixture(scope="module")
def cases_file(tmp_path_factory) -> Path:
    return write_cases(tmp_path_factory.mktemp("ray") / "cases.jsonl", 6)


@pytest.fixture(scope="module")
def reference(cases_file, tmp_path_factory) -> Path:
    """The same file through one in-process engine (the single-process `llmopt run`)."""
    from llmopt.config import EngineConfig
    from llmopt.engine.engine import LLMEngine

    engine = LLMEngine(SMOLLM2, EngineConfig(num_threads=1, kv_cache_memory_gb=0.25))
    out = tmp_path_factory.mktemp("ref") / "out.jsonl"
    BatchRun(load_batch(cases_file), out, OPTIONS, resume=False).run(engine)
    return out


@pytest.fixture(scope="module")
def pool(ray_cluster):
    from llmopt.batch.ray_runner import WorkerPool
    from llmopt.config import EngineConfig

    pool = WorkerPool(SMOLLM2, EngineConfig(num_threads=1, kv_cache_memory_gb=0.25), None, workers=2, threads=1)
    yield pool
    pool.close()


def ray_run(cases_file: Path, out: Path, pool, resume: bool = False):
    from llmopt.batch.ray_runner import RayBatchRun

    return RayBatchRun(BatchRun(load_batch(cases_file), out, OPTIONS, resume=resume), pool)


def test_ray_run_equals_the_single_process_run_in_input_order(cases_file, reference, pool, tmp_path):
    out = tmp_path / "out.jsonl"
    rr = ray_run(cases_file, out, pool)
    summary = rr.run()
    assert answers(out) == answers(reference)
    assert [x["id"] for x in lines(out)] == [f"case-{i}" for i in range(6)]
    assert all(x["result"]["duration"] > 0 for x in lines(out))
    assert len(summary.ran) == 6 and summary.output_tokens > 0
    side = [json.loads(x) for x in (tmp_path / "out.jsonl.reasoning.jsonl").read_text().splitlines()]
    assert sorted(x["id"] for x in side) == [f"case-{i}" for i in range(6)]
    pids = {s.pid for s in pool.slots}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes did the work
    assert len(rr.summary.overhead_ms) == 6 and rr.summary.replaced == 0


def test_a_killed_worker_is_replaced_and_its_case_runs_again_exactly_once(cases_file, reference, pool, tmp_path):
    out = tmp_path / "out.jsonl"
    rr = ray_run(cases_file, out, pool)
    killed: list[tuple[int, int]] = []

    def kill_a_busy_worker(slot, res) -> None:
        if killed:
            return
        import ray

        running = [s for s in pool.slots if s.task is not None and s.pid is not None
                   and not ray.wait([s.ref], timeout=0)[0]]  # still computing, not just unread
        if not running:
            return
        victim = running[0]
        killed.append((victim.task.key, victim.pid))
        os.kill(victim.pid, signal.SIGKILL)

    rr.on_result = kill_a_busy_worker
    summary = rr.run()
    assert killed, "no worker was busy when the first case finished"
    key, pid = killed[0]
    assert rr.summary.replaced == 1 and rr.summary.rerun == [key]
    assert pid not in {s.pid for s in pool.slots}
    assert answers(out) == answers(reference)  # every case exactly once, in order, same answers
    assert len(summary.ran) == 6


def test_resume_runs_only_the_missing_cases_on_ray(cases_file, reference, pool, tmp_path):
    out = tmp_path / "out.jsonl"
    done = lines(reference)
    out.write_text(json.dumps(done[4]) + "\n" + json.dumps(done[1]) + "\n")  # two cases done, out of order
    summary = ray_run(cases_file, out, pool, resume=True).run()
    assert len(summary.ran) == 4 and summary.resumed_questions == 1 + 2
    assert answers(out) == answers(reference)
    assert lines(out)[4]["result"]["duration"] == done[4]["result"]["duration"]  # kept, not recomputed


def test_a_flat_question_list_on_ray_equals_the_single_process_run(pool, tmp_path):
    from llmopt.config import EngineConfig
    from llmopt.engine.engine import LLMEngine

    qfile = tmp_path / "questions.json"
    qfile.write_text(json.dumps([{"id": i, "content": q} for i, q in enumerate(QUESTIONS[:5])]))
    ref = tmp_path / "ref.json"
    BatchRun(load_batch(qfile), ref, OPTIONS, resume=False).run(LLMEngine(SMOLLM2, EngineConfig(num_threads=1, kv_cache_memory_gb=0.25)))
    out = tmp_path / "out.json"
    ray_run(qfile, out, pool).run()
    assert json.loads(out.read_text()) == json.loads(ref.read_text())
    assert not (tmp_path / "out.json.partial.jsonl").exists()


def cli(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmopt.cli", "run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_cli_joins_a_running_cluster_by_its_address(ray_cluster, cases_file, reference, tmp_path):
    small = write_cases(tmp_path / "cases.jsonl", 2)
    out = tmp_path / "out.jsonl"
    r = cli(str(small), "-o", str(out), "--model", SMOLLM2, "--max-tokens", "6", "--concurrency", "2",
            "--ray", ray_cluster.address, "--workers", "1", "--threads-per-worker", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert answers(out) == answers(reference)[:2]
    assert "ray: 1 workers x 1 threads" in r.stderr


def test_an_unreachable_address_fails_within_seconds(tmp_path, cases_file):
    import socket

    with socket.socket() as s:  # a loopback port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    r = cli(str(cases_file), "-o", str(tmp_path / "out.jsonl"), "--ray", f"127.0.0.1:{port}", timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == 1
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in r.stderr and "ray start --head" in r.stderr
    assert took < 30  # python + imports included; the probe itself gives up after 5 s
    assert not (tmp_path / "out.jsonl").exists()


def test_without_ray_the_cli_names_the_extra(tmp_path, cases_file):
    fake = tmp_path / "no_ray"
    (fake / "ray").mkdir(parents=True)
    (fake / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    r = cli(str(cases_file), "-o", str(tmp_path / "out.jsonl"), "--ray", "local",
            env={"PYTHONPATH": os.pathsep.join([str(fake), str(ROOT)])}, timeout=60)
    assert r.returncode == 1
    assert "pip install 'llmopt[ray]'" in r.stderr
