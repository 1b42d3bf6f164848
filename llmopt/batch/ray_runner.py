"""``llmopt run --ray``: a batch file split across Ray actors, each holding one ``LLMEngine``.

The driver reads the batch and OUT (resume) exactly as ``BatchRun`` does, then hands pending work
to ``workers`` actors (``threads`` torch threads each, ``num_cpus=threads`` for Ray's placement):

- test cases: one task per case. A case runs on one worker exactly as in a single process (at most
  ``concurrency`` of its questions in that worker's engine at once) and its ``duration`` is timed
  inside the worker around that case alone, so it stays the case's own wall time.
- a flat list of questions: tasks of ``concurrency`` questions each.

Each worker holds at most one task, so a worker that dies (killed, out of memory, node lost) takes
exactly one task with it: the driver starts a replacement actor and reruns that task once; a task
whose second worker dies too ends the run with an error (finished work stays in OUT for resume).
Finished tasks are appended to OUT (or ``OUT.partial.jsonl``) as they arrive, in completion
order, and OUT is rewritten in input order at the end, so a run that stops midway resumes like a
single-process one.

The driver measures, per task, the time from submitting it to seeing its result; the worker
reports the time spent inside its method. The difference is Ray's own cost per case (scheduling,
serialization, the object store), reported as ``RaySummary.overhead_ms``.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmopt.batch.cases import Case
from llmopt.batch.runner import (
    BatchRun,
    CaseResult,
    Messages,
    RunSummary,
    _atomic_write,
    _dumps,
    _key,
    answer,
    reasoning_record,
    warm_up,
)
from llmopt.config import EngineConfig
from llmopt.distributed.cluster import Cluster, require_ray
from llmopt.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 2  # a task runs at most twice: once, and once more if its worker died


@dataclass
class Task:
    key: int  # case index (cases) or chunk number (questions)
    prompts: list[Messages]
    params: SamplingParams
    concurrency: int
    attempts: int = 0


@dataclass
class TaskResult:
    key: int
    texts: list[str]
    output_tokens: int
    reasoning: list[dict[str, Any]]  # reasoning_record per question, without the id
    duration_ms: float  # the case's own wall time (as BatchRun._run_case measures it)
    inside_ms: float  # time inside the worker's method
    pid: int


class CaseWorker:
    """A Ray actor (wrapped by ``ray.remote`` in ``WorkerPool``): one engine, one task at a time."""

    def __init__(self, model: str, config: EngineConfig, quant: str | None):
        from llmopt.engine.engine import LLMEngine

        self.engine = LLMEngine(model, config, quant=quant)
        self.warmup_s = warm_up(self.engine)

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "warmup_s": self.warmup_s, "threads": self.engine.config.threads}

    def check_prompts(self, prompts: list[tuple[str, Messages]]) -> None:
        """ValueError naming the first prompt that does not fit the context window."""
        for where, prompt in prompts:
            n = len(self.engine.encode_prompt(prompt)[0])
            if n >= self.engine.max_model_len:
                raise ValueError(f"{where}: the prompt has {n} tokens but the model's context holds "
                                 f"{self.engine.max_model_len} (prompt + at least one new token); shorten it")

    def run(self, task: Task) -> TaskResult:
        t_in = time.perf_counter()
        outs = answer(self.engine, task.prompts, task.params, task.concurrency)
        duration_ms = (time.perf_counter() - t_in) * 1000
        res = TaskResult(task.key, [o.text for o in outs], sum(len(o.token_ids) for o in outs),
                         [{k: v for k, v in reasoning_record(None, o).items() if k != "id"} for o in outs],
                         duration_ms, 0.0, os.getpid())
        res.inside_ms = (time.perf_counter() - t_in) * 1000
        return res


@dataclass
class Slot:
    """One worker position: its actor, its pid, the task it runs and when that was submitted."""

    index: int
    actor: Any
    pid: int | None = None
    task: Task | None = None
    ref: Any = None
    submitted: float = 0.0
    generation: int = 0  # 0 for the first actor, +1 per replacement


@dataclass
class RaySummary:
    workers: int
    threads: int
    replaced: int = 0  # workers that died and were replaced
    rerun: list[int] = field(default_factory=list)  # task keys rerun after their worker died
    overhead_ms: list[float] = field(default_factory=list)  # per task: driver-seen - inside-worker time
    startup_s: float = 0.0  # actors started, models loaded and warmed

    @property
    def overhead_median_ms(self) -> float:
        return statistics.median(self.overhead_ms) if self.overhead_ms else 0.0


class WorkerPool:
    """``workers`` CaseWorker actors on the connected cluster; replaces a dead one on request."""

    def __init__(self, model: str, config: EngineConfig, quant: str | None, workers: int, threads: int):
        ray = self.ray = require_ray()
        self.threads = threads
        self.args = (model, config, quant)
        self.cls = ray.remote(num_cpus=threads)(CaseWorker)
        t0 = time.perf_counter()
        self.slots = [Slot(i, self.cls.remote(*self.args)) for i in range(workers)]
        try:
            infos = ray.get([s.actor.ready.remote() for s in self.slots])
        except ray.exceptions.RayActorError as e:
            self.close()
            raise RuntimeError(f"a Ray worker could not load {model!r}: {_cause(e)}") from None
        for s, info in zip(self.slots, infos):
            s.pid = info["pid"]
        self.startup_s = time.perf_counter() - t0

    def replace(self, slot: Slot) -> None:
        try:
            self.ray.kill(slot.actor, no_restart=True)
        except Exception:  # already gone
            pass
        slot.actor, slot.pid, slot.generation = self.cls.remote(*self.args), None, slot.generation + 1

    def close(self) -> None:
        for s in self.slots:
            try:
                self.ray.kill(s.actor, no_restart=True)
            except Exception:
                pass


def _cause(e: BaseException) -> str:
    """The readable reason inside a Ray error (its cause's message when it has one)."""
    cause = getattr(e, "cause", None)
    return f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else str(e).strip().splitlines()[0]


class RayBatchRun:
    """Runs what ``run`` (a BatchRun: batch, OUT, options, resume state) has pending on ``pool``."""

    def __init__(self, run: BatchRun, pool: WorkerPool, cluster: Cluster | None = None):
        self.run_, self.pool, self.cluster = run, pool, cluster
        self.ray = pool.ray
        self.summary = RaySummary(len(pool.slots), pool.threads, startup_s=pool.startup_s)
        self.on_result: Callable[[Slot, TaskResult], None] | None = None  # test and progress hook

    # ---- tasks ----------------------------------------------------------------------------------
    def _case_tasks(self) -> list[Task]:
        r = self.run_
        return [Task(i, r.prompts(r.batch.cases[i].questions, r.batch.cases[i]), r.params(r.batch.cases[i]),
                     r.concurrency(r.batch.cases[i])) for i in r.pending_cases]

    def _question_chunks(self) -> list[list[int]]:
        r = self.run_
        todo = [i for i, q in enumerate(r.batch.questions) if _key(q.id) not in r.done_answers]
        step = r.concurrency()
        return [todo[j:j + step] for j in range(0, len(todo), step)]

    def check_prompts(self) -> None:
        r = self.run_
        prompts = []
        for case, questions in r.pending():
            for q, p in zip(questions, r.prompts(questions, case)):
                prompts.append((f"test case {case.id!r}, question {q.id!r}" if case else f"question {q.id!r}", p))
        try:
            self.ray.get(self.pool.slots[0].actor.check_prompts.remote(prompts))
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, ValueError) else RuntimeError(_cause(e))) from None

    # ---- the loop -------------------------------------------------------------------------------
    def _execute(self, tasks: list[Task], done: Callable[[Task, TaskResult], None]) -> None:
        """Run ``tasks`` on the pool, one per worker at a time; ``done`` gets each result once."""
        ray = self.ray
        todo = deque(tasks)
        busy: dict[Any, Slot] = {}
        try:
            while todo or busy:
                for slot in self.pool.slots:
                    if slot.task is None and todo:
                        slot.task = todo.popleft()
                        slot.task.attempts += 1
                        slot.submitted = time.perf_counter()
                        slot.ref = slot.actor.run.remote(slot.task)
                        busy[slot.ref] = slot
                ready, _ = ray.wait(list(busy), num_returns=1, timeout=1.0)
                for ref in ready:
                    slot = busy.pop(ref)
                    task, slot.task, slot.ref = slot.task, None, None
                    assert task is not None
                    seen = time.perf_counter()
                    try:
                        res: TaskResult = ray.get(ref)
                    except ray.exceptions.RayActorError as e:
                        self._worker_died(slot, task, e, todo)
                        continue
                    except ray.exceptions.RayTaskError as e:
                        raise RuntimeError(f"{self._name(task)} failed on a Ray worker: {_cause(e)}") from None
                    slot.pid = res.pid
                    self.summary.overhead_ms.append((seen - slot.submitted) * 1000 - res.inside_ms)
                    done(task, res)
                    if self.on_result:
                        self.on_result(slot, res)
        finally:  # an error or Ctrl-C: stop what still runs (the pool's owner kills the actors too)
            for ref in busy:
                try:
                    ray.cancel(ref)
                except Exception:  # already finished or its worker is gone
                    pass

    def _name(self, task: Task) -> str:
        r = self.run_
        if r.batch.kind == "cases":
            return f"test case {r.batch.cases[task.key].id!r}"
        return f"questions chunk {task.key}"

    def _worker_died(self, slot: Slot, task: Task, e: BaseException, todo: deque[Task]) -> None:
        why = _cause(e)
        if task.attempts >= MAX_ATTEMPTS:
            raise RuntimeError(f"{self._name(task)}: its worker died {task.attempts} times (last: {why}); "
                               f"finished work is in {self.run_.out}: run the same command again to resume, "
                               f"with more memory per worker if it ran out") from None
        log.warning("worker %d (pid %s) died running %s (%s); starting a replacement and running it again",
                    slot.index, slot.pid, self._name(task), why)
        self.pool.replace(slot)
        self.summary.replaced += 1
        self.summary.rerun.append(task.key)
        todo.appendleft(task)

    # ---- output ---------------------------------------------------------------------------------
    def run(self, on_case: Callable[[CaseResult], None] | None = None) -> RunSummary:
        r = self.run_
        r.out.parent.mkdir(parents=True, exist_ok=True)
        if r.pending():
            self.check_prompts()
        if not r.done_cases and not r.done_answers:
            r.reasoning_out.unlink(missing_ok=True)
        if r.batch.kind == "cases":
            return self._run_cases(on_case)
        return self._run_questions()

    def _run_cases(self, on_case: Callable[[CaseResult], None] | None) -> RunSummary:
        r = self.run_
        lines = {i: _dumps(obj) for i, obj in r.done_cases.items()}
        _atomic_write(r.out, "".join(lines[i] + "\n" for i in sorted(lines)))
        results: dict[int, CaseResult] = {}
        with r.out.open("a", encoding="utf-8") as f, r.reasoning_out.open("a", encoding="utf-8") as side:
            def done(task: Task, res: TaskResult) -> None:
                case: Case = r.batch.cases[task.key]
                rows = [{"id": q.id, "content": t} for q, t in zip(case.questions, res.texts)]
                lines[task.key] = _dumps({"id": case.id, "result": {"results": rows, "duration": res.duration_ms}})
                f.write(lines[task.key] + "\n")
                f.flush()
                side.write(_dumps({"id": case.id, "duration": res.duration_ms,
                                   "questions": [{"id": q.id, **rec} for q, rec in zip(case.questions, res.reasoning)]})
                           + "\n")
                side.flush()
                results[task.key] = cr = CaseResult(case.id, rows, res.duration_ms, res.output_tokens)
                if on_case:
                    on_case(cr)

            self._execute(self._case_tasks(), done)
        _atomic_write(r.out, "".join(lines[i] + "\n" for i in sorted(lines)))  # input order
        cases = []
        for i, case in enumerate(r.batch.cases):
            if i in results:
                cases.append(results[i])
            else:
                res = r.done_cases[i]["result"]
                cases.append(CaseResult(case.id, res["results"], res["duration"], resumed=True))
        return RunSummary("cases", r.out, cases, sum(len(c.results) for c in cases if c.resumed))

    def _run_questions(self) -> RunSummary:
        r = self.run_
        qs = r.batch.questions
        done_answers = dict(r.done_answers)
        resumed = len(done_answers)
        chunks = self._question_chunks()
        _atomic_write(r.partial, "".join(_dumps({"id": q.id, "content": done_answers[_key(q.id)]}) + "\n"
                                         for q in qs if _key(q.id) in done_answers))
        r.out.unlink(missing_ok=True)
        cases: list[CaseResult] = []
        if chunks:
            params, conc = r.params(), r.concurrency()
            all_prompts = r.prompts(qs)
            tasks = [Task(k, [all_prompts[i] for i in idx], params, conc) for k, idx in enumerate(chunks)]
            rows: list[dict[str, Any]] = []
            tokens = 0
            with r.partial.open("a", encoding="utf-8") as f, r.reasoning_out.open("a", encoding="utf-8") as side:
                def done(task: Task, res: TaskResult) -> None:
                    nonlocal tokens
                    for i, text in zip(chunks[task.key], res.texts):
                        done_answers[_key(qs[i].id)] = text
                        rows.append({"id": qs[i].id, "content": text})
                        f.write(_dumps({"id": qs[i].id, "content": text}) + "\n")
                    f.flush()
                    recs = [{"id": qs[i].id, **rec} for i, rec in zip(chunks[task.key], res.reasoning)]
                    side.write(_dumps({"id": None, "duration": res.duration_ms, "questions": recs}) + "\n")
                    side.flush()
                    tokens += res.output_tokens

                t0 = time.perf_counter()
                self._execute(tasks, done)
                wall_ms = (time.perf_counter() - t0) * 1000
            cases.append(CaseResult(None, rows, wall_ms, tokens))
        import json

        doc = {"result": {"results": [{"id": q.id, "content": done_answers[_key(q.id)]} for q in qs]}}
        _atomic_write(r.out, json.dumps(doc, ensure_ascii=False, indent=2) + "\n")
        r.partial.unlink()
        return RunSummary("questions", r.out, cases, resumed)
