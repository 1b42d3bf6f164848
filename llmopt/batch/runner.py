"""Run a batch file (see ``llmopt.batch.cases``) through one ``LLMEngine`` and write the results.

Test cases run one after another, in input order; inside a case at most ``concurrency`` of its
questions are in the engine at once, and a new one is added as soon as one finishes. A case's
``duration`` is the wall time from just before its first question is added (chat template and
tokenization included) to the step that finishes its last answer, in milliseconds. Model loading
and file writing are outside it.

Output files (docs/batch.md):

- test cases: OUT is JSONL, one line per case, appended (and flushed) as soon as the case
  finishes; in input order once the run is complete::

      {"id": <case id>, "result": {"results": [{"id": <question id>, "content": "<answer>"}, ...],
                                   "duration": 41.72}}

  ``result`` is exactly the competition's per-case object; ``id`` is the case id, which lets a later
  run with ``resume`` skip the case (the line's question ids must also match the case's).
- reasoning efficiency goes to a side file, ``OUT.reasoning.jsonl`` (the competition objects stay
  as they are): one line per test case run (flat mode: one line for the run) with its duration and,
  per question, think tokens, answer tokens, JCT (ms, arrival to finish), who closed the think part
  (``model``, ``budget``, ``early_exit``, ``loop``, ``eos``, or null), where early exit fired and the probes'
  tokens (docs/reasoning.md).
- a flat list of questions: OUT is the single JSON object ``{"result": {"results": [...]}}``,
  written atomically at the end. Until then each answer is appended to ``OUT.partial.jsonl``
  (``{"id": ..., "content": ...}`` per line), which ``resume`` reads and the end removes.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmopt.batch.cases import Batch, Case, Id, Question
from llmopt.engine.sampling_params import SamplingParams
from llmopt.engine.sequence import RequestOutput
from llmopt.reasoning.budget import (
    DEFAULT_DIFFICULTY_BUDGET_THRESHOLD,
    DEFAULT_DIFFICULTY_TOKENS,
    DEFAULT_THINK_GATE_THRESHOLD,
)
from llmopt.reasoning.early_exit import DEFAULT_THRESHOLD
from llmopt.tasks.base import REASONING_SYSTEM_PROMPT

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = REASONING_SYSTEM_PROMPT  # asks for <think>...</think> <answer>...</answer>
ANSWER_END = "</answer>"

Messages = list[dict[str, str]]


@dataclass
class RunOptions:
    """Run-wide settings; a case or the file overrides ``system``, ``concurrency`` and ``max_tokens``."""

    system: str = DEFAULT_SYSTEM_PROMPT  # "" sends no system message
    max_tokens: int = 256
    concurrency: int = 4
    temperature: float = 0.0  # greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_at_answer: bool = True  # end an answer at its first </answer> (kept in the text)
    think_budget: int | None = None  # close <think> after this many tokens (a case's think_budget wins)
    answer_budget: int | None = None  # close <answer> this many tokens after thinking ended
    early_exit: bool = False  # DEER-style confidence early exit (llmopt.reasoning.early_exit)
    early_exit_threshold: float = DEFAULT_THRESHOLD
    loop_exit: bool = False  # close <think> when it starts repeating itself (llmopt.reasoning.loops)
    think_budget_threshold: float | None = None  # gate the think budget: cut there only on a confident trial answer
    think_budget_max: int | None = None  # the gated budget's hard cap (None: where the answer fits max_tokens)
    jump_forward: bool = False  # write the rest of a format tag in one step once the model starts it
    low_confidence_exit: float | None = None  # close <think> in place of a think token chosen below this probability
    think_gate: int | None = None  # after this many think tokens, close <think> if the model was unsure of them
    think_gate_threshold: float = DEFAULT_THINK_GATE_THRESHOLD  # their geometric-mean probability, below: close
    difficulty_exit: float | None = None  # close <think> early for prompts the difficulty probe gives P(wrong) above
    difficulty_exit_tokens: int = DEFAULT_DIFFICULTY_TOKENS  # ... at this many think tokens
    difficulty_budget: int | None = None  # cap thinking at this many tokens for prompts with P(wrong) above ...
    difficulty_budget_threshold: float = DEFAULT_DIFFICULTY_BUDGET_THRESHOLD  # ... this

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.concurrency < 1:
            raise ValueError(f"max_tokens and concurrency must be >= 1, got {self.max_tokens} and {self.concurrency}")
        SamplingParams(think_budget=self.think_budget, answer_budget=self.answer_budget, early_exit=self.early_exit,
                       early_exit_threshold=self.early_exit_threshold, loop_exit=self.loop_exit,
                       think_budget_threshold=self.think_budget_threshold, think_budget_max=self.think_budget_max,
                       jump_forward=self.jump_forward,
                       low_confidence_exit=self.low_confidence_exit, think_gate=self.think_gate,
                       think_gate_threshold=self.think_gate_threshold, difficulty_exit=self.difficulty_exit,
                       difficulty_exit_tokens=self.difficulty_exit_tokens, difficulty_budget=self.difficulty_budget,
                       difficulty_budget_threshold=self.difficulty_budget_threshold)  # ValueError naming a bad value


@dataclass
class CaseResult:
    """One finished test case (in flat mode: all the questions answered by this run)."""

    id: Id | None
    results: list[dict[str, Any]]  # [{"id": question id, "content": answer}] in input order
    duration_ms: float
    output_tokens: int = 0
    outputs: list[RequestOutput] = field(default_factory=list, repr=False)  # empty for resumed cases
    resumed: bool = False


@dataclass
class RunSummary:
    kind: str  # "cases" | "questions"
    out: Path
    cases: list[CaseResult]  # in input order; flat mode: at most one (this run's answers)
    resumed_questions: int  # answers taken from OUT (or OUT.partial.jsonl) instead of computed

    @property
    def ran(self) -> list[CaseResult]:
        return [c for c in self.cases if not c.resumed]

    @property
    def questions(self) -> int:
        return sum(len(c.results) for c in self.ran)

    @property
    def duration_ms(self) -> float:
        return sum(c.duration_ms for c in self.ran)

    @property
    def output_tokens(self) -> int:
        return sum(c.output_tokens for c in self.ran)

    @property
    def tokens_per_s(self) -> float:
        return 1000 * self.output_tokens / self.duration_ms if self.duration_ms > 0 else 0.0


def messages_for(question: Question, *systems: str | None) -> Messages:
    """The chat prompt of a question: the first set system prompt of question, ``systems`` (case,
    file, run default), then the question as the user message. An empty system prompt sends none."""
    system = next((s for s in (question.system, *systems) if s is not None), "")
    user = {"role": "user", "content": question.content}
    return [{"role": "system", "content": system}, user] if system else [user]


def answer(engine: Any, prompts: list[Messages], params: SamplingParams, concurrency: int,
           on_answer: Callable[[int, RequestOutput], None] | None = None) -> list[RequestOutput]:
    """Answer ``prompts`` with at most ``concurrency`` of them in the engine at once, adding the next
    as soon as one finishes. Returns the final outputs in input order. On any exception (Ctrl-C
    included) the requests still in the engine are aborted."""
    tag = uuid.uuid4().hex[:8]
    todo = deque(enumerate(prompts))
    in_flight: dict[str, int] = {}
    results: list[RequestOutput | None] = [None] * len(prompts)
    try:
        while todo or in_flight:
            while todo and len(in_flight) < concurrency:
                i, prompt = todo.popleft()
                seq = engine.add_request(prompt, params, request_id=f"batch-{tag}-{i}")
                in_flight[seq.request_id] = i
            for out in engine.step():
                if out.finished and out.request_id in in_flight:
                    i = in_flight.pop(out.request_id)
                    results[i] = out
                    if on_answer:
                        on_answer(i, out)
            if in_flight and not engine.has_unfinished():
                raise RuntimeError(f"the engine dropped requests {sorted(in_flight)} without finishing them")
    finally:
        for rid in in_flight:
            engine.abort(rid)
    return results  # type: ignore[return-value]


def check_output_path(out: Path) -> None:
    """Fail before any work (and before the model loads) if results cannot be written to ``out``:
    an existing directory, a path under a file, or a place this user cannot create files in."""
    if out.is_dir():
        raise ValueError(f"-o {out} is a directory; give a file path such as {out / 'results.jsonl'}")
    for parent in out.parents:  # nearest existing ancestor: the one a mkdir -p would start from
        if not parent.exists() and not parent.is_symlink():
            continue
        if not parent.is_dir():
            raise ValueError(f"-o {out}: {parent} is a file, not a directory; choose an output path "
                             f"whose parent directories are directories")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"-o {out}: cannot create files in {parent} (permission denied); "
                             f"choose a writable directory")
        return


def warm_up(engine: Any) -> float | None:
    """Build and load every native kernel and run one two-token greedy request, so that neither
    compilation nor first-call setup (lazily packed weights, thread pools) lands in the first
    timed case. Returns the seconds it took, or None for an engine that has already run a step
    (it is warm)."""
    from llmopt.kernels.build import warm_kernels

    if engine.stats["steps"] > 0:
        return None
    t0 = time.perf_counter()
    ready = warm_kernels()
    answer(engine, [[{"role": "user", "content": "Hello"}]], SamplingParams(max_tokens=2, temperature=0.0), 1)
    took = time.perf_counter() - t0
    log.info("warm-up: %.2fs (native kernels: %s)", took, ", ".join(n for n, ok in ready.items() if ok) or "none")
    return took


def reasoning_record(qid: Id, out: RequestOutput) -> dict[str, Any]:
    """One answer's reasoning efficiency: think / answer tokens, JCT, budget and early-exit events."""
    r, m = out.reasoning, out.metrics
    jct = (m.finish_time - m.arrival_time) * 1000 if m.finish_time is not None else None
    rec: dict[str, Any] = {"id": qid, "jct_ms": jct, "output_tokens": len(out.token_ids)}
    if r is not None:
        rec |= {"think_tokens": r.think_tokens, "answer_tokens": r.answer_tokens, "closed_by": r.closed_by,
                "early_exit_at": r.exit_at, "probes": r.probes, "probe_tokens": r.probe_tokens,
                "probe_prefix_hit_rate": r.probe_prefix_hit_rate}
        if r.p_wrong is not None:  # --difficulty-exit: the probe's estimate for this question
            rec["p_wrong"] = round(r.p_wrong, 4)
    return rec


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _key(x: Id) -> tuple[type, Id]:  # 1 and "1" are different ids
    return (type(x), x)


def _read_jsonl(path: Path, what: str) -> list[tuple[int, dict]]:
    """(line number, object) of a results file; a truncated last line (an interrupted write) is dropped."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                log.warning("%s line %d is incomplete (an interrupted write); it is dropped", path, n)
                continue
            obj = None
        if not isinstance(obj, dict):
            raise ValueError(f"{path} line {n} is not {what}; fix or remove it, or run with --no-resume "
                             f"to overwrite {path}")
        rows.append((n, obj))
    return rows


def _is_results(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(r, dict) and "id" in r and isinstance(r.get("content"), str)
                                       for r in x)


class BatchRun:
    """One run of a batch file into ``out``. With ``resume``, what ``out`` already holds for this
    batch is read first and only the rest is computed; without it ``out`` is overwritten."""

    def __init__(self, batch: Batch, out: str | Path, options: RunOptions | None = None, resume: bool = True):
        self.batch, self.out, self.options = batch, Path(out), options or RunOptions()
        self.partial = self.out.with_name(self.out.name + ".partial.jsonl")
        check_output_path(self.out)
        self.reasoning_out = self.out.with_name(self.out.name + ".reasoning.jsonl")
        if self.out.resolve() == batch.path.resolve():
            raise ValueError(f"the output file {self.out} is the input file; choose another -o")
        self.warmup_s: float | None = None  # time of warm_up() in the last run, None if not run
        self.done_cases: dict[int, dict] = {}  # case index -> its line in OUT
        self.done_answers: dict[tuple[type, Id], str] = {}  # flat mode: question id -> content
        if resume and batch.kind == "cases":
            self.done_cases = self._read_done_cases()
        elif resume:
            self.done_answers = self._read_done_answers()

    # ---- settings per case ----------------------------------------------------------------------
    def concurrency(self, case: Case | None = None) -> int:
        return (case and case.concurrency) or self.batch.concurrency or self.options.concurrency

    def params(self, case: Case | None = None) -> SamplingParams:
        o = self.options
        return SamplingParams(max_tokens=(case and case.max_tokens) or self.batch.max_tokens or o.max_tokens,
                              temperature=o.temperature, top_p=o.top_p, seed=o.seed,
                              stop=[ANSWER_END] if o.stop_at_answer else None, include_stop_str_in_output=True,
                              think_budget=(case and case.think_budget) or self.batch.think_budget or o.think_budget,
                              answer_budget=o.answer_budget, early_exit=o.early_exit,
                              early_exit_threshold=o.early_exit_threshold, loop_exit=o.loop_exit,
                              think_budget_threshold=o.think_budget_threshold, think_budget_max=o.think_budget_max,
                              jump_forward=o.jump_forward, low_confidence_exit=o.low_confidence_exit,
                              think_gate=o.think_gate, think_gate_threshold=o.think_gate_threshold,
                              difficulty_exit=o.difficulty_exit, difficulty_exit_tokens=o.difficulty_exit_tokens,
                              difficulty_budget=o.difficulty_budget,
                              difficulty_budget_threshold=o.difficulty_budget_threshold)

    def prompts(self, questions: tuple[Question, ...], case: Case | None = None) -> list[Messages]:
        return [messages_for(q, case and case.system, self.batch.system, self.options.system) for q in questions]

    @property
    def max_concurrency(self) -> int:
        cases = self.batch.cases or (None,)
        return max(self.concurrency(c) for c in cases)

    @property
    def pending_cases(self) -> list[int]:
        return [i for i in range(len(self.batch.cases)) if i not in self.done_cases]

    def pending(self) -> list[tuple[Case | None, tuple[Question, ...]]]:
        """What is left to answer: (case, its questions) per pending case, or (None, questions) in flat mode."""
        if self.batch.kind == "cases":
            return [(self.batch.cases[i], self.batch.cases[i].questions) for i in self.pending_cases]
        todo = tuple(q for q in self.batch.questions if _key(q.id) not in self.done_answers)
        return [(None, todo)] if todo else []

    @property
    def pending_questions(self) -> int:
        return sum(len(qs) for _, qs in self.pending())

    # ---- resume ---------------------------------------------------------------------------------
    def _read_done_cases(self) -> dict[int, dict]:
        index = {_key(c.id): i for i, c in enumerate(self.batch.cases)}
        done: dict[int, dict] = {}
        for n, obj in _read_jsonl(self.out, "a test case result of `llmopt run`"):
            result = obj.get("result")
            if ("id" not in obj or not isinstance(result, dict) or not _is_results(result.get("results"))
                    or not isinstance(result.get("duration"), (int, float))):
                raise ValueError(f"{self.out} line {n} is not a test case result of `llmopt run` "
                                 f'({{"id": ..., "result": {{"results": [...], "duration": ...}}}}); '
                                 f"run with --no-resume to overwrite {self.out}")
            i = index.get(_key(obj["id"]))
            if i is None:
                raise ValueError(f"{self.out} line {n} holds test case {obj['id']!r}, which is not in "
                                 f"{self.batch.path}: is -o the right file? --no-resume overwrites it")
            case = self.batch.cases[i]
            if [r["id"] for r in result["results"]] != [q.id for q in case.questions]:
                log.warning("%s line %d: the question ids of case %r changed; the case is run again",
                            self.out, n, case.id)
                done.pop(i, None)
                continue
            done[i] = obj
        return done

    def _read_done_answers(self) -> dict[tuple[type, Id], str]:
        answers: list[tuple[str, dict]] = []
        if self.out.exists():
            try:
                doc = json.loads(self.out.read_text(encoding="utf-8"))
                results = doc["result"]["results"]
                assert _is_results(results)
            except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
                raise ValueError(f"{self.out} is not a result of `llmopt run` "
                                 f'({{"result": {{"results": [...]}}}}); run with --no-resume to overwrite it') \
                    from None
            answers += [(str(self.out), r) for r in results]
        for n, r in _read_jsonl(self.partial, 'an answer ({"id": ..., "content": ...})'):
            if not _is_results([r]):
                raise ValueError(f'{self.partial} line {n} is not an answer ({{"id": ..., "content": ...}}); '
                                 f"remove the file or run with --no-resume")
            answers.append((f"{self.partial} line {n}", r))
        ids = {_key(q.id) for q in self.batch.questions}
        done: dict[tuple[type, Id], str] = {}
        for where, r in answers:
            if _key(r["id"]) not in ids:
                raise ValueError(f"{where} answers question {r['id']!r}, which is not in {self.batch.path}: "
                                 f"is -o the right file? --no-resume overwrites it")
            done[_key(r["id"])] = r["content"]
        return done

    # ---- running --------------------------------------------------------------------------------
    def check_prompts(self, engine: Any) -> None:
        """Fail before any work if a pending question's prompt does not fit the context window."""
        for case, questions in self.pending():
            for q, prompt in zip(questions, self.prompts(questions, case)):
                n = len(engine.encode_prompt(prompt)[0])
                if n >= engine.max_model_len:
                    where = f"test case {case.id!r}, question {q.id!r}" if case else f"question {q.id!r}"
                    raise ValueError(f"{where}: the prompt has {n} tokens but the model's context holds "
                                     f"{engine.max_model_len} (prompt + at least one new token); shorten it")

    def run(self, engine: Any, on_answer: Callable[[Case | None, RequestOutput], None] | None = None,
            on_case: Callable[[CaseResult], None] | None = None) -> RunSummary:
        """Compute what is pending and write ``out``. ``on_answer`` is called for each finished
        answer, ``on_case`` after each test case is written."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.check_prompts(engine)
        if self.pending():
            self.warmup_s = warm_up(engine)
        if not self.done_cases and not self.done_answers:  # a fresh run: a fresh side file
            self.reasoning_out.unlink(missing_ok=True)
        if self.batch.kind == "cases":
            return self._run_cases(engine, on_answer, on_case)
        return self._run_questions(engine, on_answer)

    def _run_case(self, engine: Any, case: Case,
                  on_answer: Callable[[Case | None, RequestOutput], None] | None) -> CaseResult:
        prompts = self.prompts(case.questions, case)
        params = self.params(case)
        t0 = time.perf_counter()
        outs = answer(engine, prompts, params, self.concurrency(case),
                      on_answer=(lambda i, o: on_answer(case, o)) if on_answer else None)
        duration_ms = (time.perf_counter() - t0) * 1000
        results = [{"id": q.id, "content": o.text} for q, o in zip(case.questions, outs)]
        return CaseResult(case.id, results, duration_ms, sum(len(o.token_ids) for o in outs), outs)

    def _write_reasoning(self, res: CaseResult, questions: tuple[Question, ...] | list[Question]) -> None:
        """Append the case's reasoning-efficiency line to the side file (docs/reasoning.md)."""
        line = {"id": res.id, "duration": res.duration_ms,
                "questions": [reasoning_record(q.id, o) for q, o in zip(questions, res.outputs)]}
        with self.reasoning_out.open("a", encoding="utf-8") as f:
            f.write(_dumps(line) + "\n")

    def _run_cases(self, engine: Any, on_answer, on_case) -> RunSummary:
        lines = {i: _dumps(obj) for i, obj in self.done_cases.items()}
        order = sorted(lines)  # case indices in the order of OUT's lines
        _atomic_write(self.out, "".join(lines[i] + "\n" for i in order))  # drops stale and truncated lines
        cases: list[CaseResult] = []
        with self.out.open("a", encoding="utf-8") as f:
            for i, case in enumerate(self.batch.cases):
                if i in self.done_cases:
                    result = self.done_cases[i]["result"]
                    cases.append(CaseResult(case.id, result["results"], result["duration"], resumed=True))
                    continue
                res = self._run_case(engine, case, on_answer)
                lines[i] = _dumps({"id": case.id, "result": {"results": res.results, "duration": res.duration_ms}})
                f.write(lines[i] + "\n")
                f.flush()
                self._write_reasoning(res, case.questions)
                order.append(i)
                cases.append(res)
                if on_case:
                    on_case(res)
        if order != sorted(order):  # resumed cases that come after new ones: restore input order
            _atomic_write(self.out, "".join(lines[i] + "\n" for i in sorted(order)))
        return RunSummary("cases", self.out, cases, sum(len(c.results) for c in cases if c.resumed))

    def _run_questions(self, engine: Any, on_answer) -> RunSummary:
        qs = self.batch.questions
        done = dict(self.done_answers)
        resumed = len(done)
        todo = [q for q in qs if _key(q.id) not in done]
        # From here until the end OUT does not exist and the partial file holds every answer so far
        # (those read from OUT included): an interruption leaves one consistent place to resume from.
        _atomic_write(self.partial, "".join(_dumps({"id": q.id, "content": done[_key(q.id)]}) + "\n"
                                            for q in qs if _key(q.id) in done))
        self.out.unlink(missing_ok=True)
        cases: list[CaseResult] = []
        if todo:
            with self.partial.open("a", encoding="utf-8") as f:
                def write(i: int, out: RequestOutput) -> None:
                    done[_key(todo[i].id)] = out.text
                    f.write(_dumps({"id": todo[i].id, "content": out.text}) + "\n")
                    f.flush()
                    if on_answer:
                        on_answer(None, out)

                t0 = time.perf_counter()
                outs = answer(engine, self.prompts(tuple(todo)), self.params(), self.concurrency(), write)
                duration_ms = (time.perf_counter() - t0) * 1000
            cases.append(CaseResult(None, [{"id": q.id, "content": o.text} for q, o in zip(todo, outs)],
                                    duration_ms, sum(len(o.token_ids) for o in outs), outs))
            self._write_reasoning(cases[-1], todo)
        doc = {"result": {"results": [{"id": q.id, "content": done[_key(q.id)]} for q in qs]}}
        _atomic_write(self.out, json.dumps(doc, ensure_ascii=False, indent=2) + "\n")
        self.partial.unlink()
        return RunSummary("questions", self.out, cases, resumed)
