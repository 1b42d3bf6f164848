"""``llmopt run``: a thin typer command over ``llmopt.batch``. The main CLI registers ``run_command``;
heavy imports (torch, the engine) stay inside it so that ``llmopt --help`` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from llmopt.models.registry import REASONING_MODEL  # already imported by the main CLI
from llmopt.reasoning.early_exit import DEFAULT_THRESHOLD  # pure, no heavy imports
from llmopt.reasoning.budget import (  # pure, no heavy imports
    DEFAULT_DIFFICULTY_BUDGET_THRESHOLD,
    DEFAULT_DIFFICULTY_TOKENS,
    DEFAULT_THINK_GATE_THRESHOLD,
)

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from llmopt.batch.ray_runner import RaySummary
    from llmopt.batch.runner import BatchRun, CaseResult, RunSummary
    from llmopt.config import EngineConfig


def summary_table(summary: RunSummary, load_s: float | None, wall_s: float) -> Table:
    """Cases, questions, total / mean case duration and output tokens/s of this run."""
    from rich.table import Table

    t = Table(title=f"llmopt run -> {summary.out}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    total = len(summary.cases)
    if summary.kind == "cases":
        t.add_row("test cases run / resumed / total",
                  f"{len(summary.ran)} / {total - len(summary.ran)} / {total}")
    t.add_row("questions answered / resumed", f"{summary.questions} / {summary.resumed_questions}")
    if summary.kind == "cases":
        t.add_row("total case duration", f"{summary.duration_ms:,.1f} ms")
        t.add_row("mean case duration", f"{summary.duration_ms / len(summary.ran):,.1f} ms" if summary.ran else "-")
    else:
        t.add_row("inference time", f"{summary.duration_ms:,.1f} ms")
    t.add_row("output tokens", f"{summary.output_tokens:,}")
    t.add_row("output tokens/s", f"{summary.tokens_per_s:.1f}" if summary.ran else "-")
    t.add_row("model load", f"{load_s:.1f} s" if load_s is not None else "not needed")
    t.add_row("wall time", f"{wall_s:.1f} s")
    return t


def run_command(
    cases: Annotated[Path, typer.Argument(help="batch file: test cases or a flat list of questions, .jsonl or "
                                               ".json (schema: docs/batch.md)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="results: JSONL, one line per test case; or one "
                                                                "JSON object for a flat list of questions")],
    model: Annotated[str, typer.Option(help="registry name, Hugging Face directory or .gguf file; default: the trained reasoning model")] = REASONING_MODEL,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="skip what OUT already holds for these "
                                                                      "cases (by id); --no-resume overwrites OUT")] = True,
    system: Annotated[Optional[str], typer.Option(help="default system prompt (\"\" = none; a file's 'system' "
                                                       "fields win); default: asks for <think>/<answer>")] = None,
    max_tokens: Annotated[int, typer.Option(help="most new tokens per answer where the file sets no max_tokens",
                                            min=1)] = 256,
    concurrency: Annotated[int, typer.Option(help="questions in flight at once where the file sets no "
                                                  "concurrency", min=1)] = 4,
    temperature: Annotated[float, typer.Option(help="0 = greedy", min=0.0)] = 0.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass", min=0.0, max=1.0)] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="sampling seed (with --temperature > 0)")] = None,
    stop_at_answer: Annotated[bool, typer.Option("--stop-at-answer/--no-stop-at-answer",
                                                 help="end each answer at its first </answer>")] = True,
    think_budget: Annotated[Optional[int], typer.Option(help="close <think> after this many tokens where the file "
                                                             "sets no think_budget (docs/reasoning.md)",
                                                        min=1)] = None,
    answer_budget: Annotated[Optional[int], typer.Option(help="close <answer> this many tokens after thinking the "
                                                              "engine closed (tags included; an answer after the "
                                                              "model's own </think> is not capped; docs/reasoning.md)", min=1)] = None,
    early_exit: Annotated[bool, typer.Option("--early-exit/--no-early-exit",
                                             help="stop thinking when a trial answer at a pause is confident")] = False,
    early_exit_threshold: Annotated[float, typer.Option(help="mean token probability a trial answer needs, (0, 1]",
                                                        min=0.0, max=1.0)] = DEFAULT_THRESHOLD,
    loop_exit: Annotated[bool, typer.Option("--loop-exit/--no-loop-exit",
                                            help="close <think> when it starts repeating itself (a greedy loop), and "
                                                 "before the answer would no longer fit max_tokens; on by default: "
                                                 "no answer changed on 400 held-out items (docs/reasoning.md)")] = True,
    think_budget_threshold: Annotated[Optional[float], typer.Option(
        help="gate the think budget: at the budget try the answer and cut only if its mean token probability is "
             "above this, (0, 1]; else think on to --think-budget-max (docs/reasoning.md)")] = None,
    think_budget_max: Annotated[Optional[int], typer.Option(
        help="hard cap on thinking with --think-budget-threshold (default: where the answer fits)", min=1)] = None,
    jump_forward: Annotated[bool, typer.Option("--jump-forward/--no-jump-forward",
                                               help="write the rest of a format tag (<think>, </think>, </answer>) in "
                                                    "one step once the model starts it; on by default (with loop "
                                                    "exit 0.80x the JCT, docs/reasoning.md)")] = True,
    low_confidence_exit: Annotated[Optional[float], typer.Option(
        help="close <think> in place of a think token the model chose with a probability below this, in (0, 1): "
             "thinking that turned into guessing (docs/reasoning.md)", min=0.0, max=1.0)] = None,
    think_gate: Annotated[Optional[int], typer.Option(
        help="after this many think tokens close <think> if the model was unsure of them (their geometric-mean "
             "probability below --think-gate-threshold): an unsure start rarely ends right; 24 measured "
             "(docs/reasoning.md)", min=1)] = None,
    think_gate_threshold: Annotated[float, typer.Option(
        help="with --think-gate: the geometric-mean token probability below which thinking is closed, in (0, 1)",
        min=0.0, max=1.0)] = DEFAULT_THINK_GATE_THRESHOLD,
    difficulty_exit: Annotated[Optional[float], typer.Option(
        help="close <think> at --difficulty-exit-tokens think tokens for questions the model's difficulty probe "
             "gives a chance of a wrong answer above this, in (0, 1) (the reasoning model ships one; "
             "docs/reasoning.md)", min=0.0, max=1.0)] = None,
    difficulty_exit_tokens: Annotated[int, typer.Option(
        help="with --difficulty-exit: think tokens a question judged hard gets", min=1)] = DEFAULT_DIFFICULTY_TOKENS,
    difficulty_budget: Annotated[Optional[int], typer.Option(
        help="a second tier (looser: a lower threshold, more tokens; or stricter: a higher threshold, fewer "
             "tokens): cap thinking at this many tokens for questions the difficulty probe gives a chance of a "
             "wrong answer above --difficulty-budget-threshold (docs/reasoning.md)", min=1)] = None,
    difficulty_budget_threshold: Annotated[float, typer.Option(
        help="with --difficulty-budget: the P(wrong) above which it applies, in (0, 1)", min=0.0,
        max=1.0)] = DEFAULT_DIFFICULTY_BUDGET_THRESHOLD,
    difficulty_probe: Annotated[Optional[Path], typer.Option(
        help="difficulty probe file for --difficulty-exit (`llmopt train probe`; default: the model's own, "
             "if it ships one)")] = None,
    quant: Annotated[Optional[str], typer.Option(help="quantize on load: int8, int4, ... (RTN); fp32: float (a .gguf dequantized); default: as stored (a .gguf runs on its own blocks)")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="LoRA adapter merged at load (`llmopt train`'s OUT/adapter.safetensors)")] = None,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: $LLMOPT_NUM_THREADS or all "
                                                        "cores; 1 is faster on a busy machine)", min=1)] = None,
    kv_policy: Annotated[str, typer.Option(help="KV policy: full, streaming, snapkv, h2o (free blocks) or quest (sparse reads) "
                                                "(docs/long_context.md)")] = "full",
    kv_budget: Annotated[Optional[str], typer.Option(help="KV budget with --kv-policy: a fraction of the prompt "
                                                          "(0.25) or a token count (2048)")] = None,
    kv_dtype: Annotated[Optional[str], typer.Option(help="KV cache element type: float16 (half the bytes of a float32 cache), int8 or fp8 "
                                                        "(e4m3) (default: the model's "
                                                        "dtype; docs/long_context.md)")] = None,
    kv_quest_pin: Annotated[float, typer.Option(help="quest: the fraction of each decode step's block budget pinned to the blocks the prompt's last 32 tokens attended to most (0.25 measured best; 0 = plain Quest; docs/long_context.md 2b)", min=0.0, max=1.0)] = 0.0,
    speculative: Annotated[str, typer.Option(help="speculative decoding of greedy answers: 'ngram' (drafts looked up "
                                                  "in the question and the answer so far, checked by the model in the "
                                                  "same step: the same tokens, fewer steps) or 'off' (docs/reasoning.md)")] = "ngram",
    num_speculative_tokens: Annotated[int, typer.Option(help="with --speculative ngram: most draft tokens per "
                                                             "answer and step", min=1, max=16)] = 3,
    ray: Annotated[Optional[str], typer.Option("--ray", metavar="ADDRESS",
                                               help="split the cases across Ray workers: 'local' (a cluster on "
                                                    "this machine), 'auto' (the one `ray start` runs here) or "
                                                    "the head's HOST:PORT; needs pip install 'llmopt\\[ray]' "
                                                    "(docs/scale.md)")] = None,
    workers: Annotated[Optional[int], typer.Option(help="with --ray: engine workers (default: as many as the "
                                                        "cluster's CPUs hold)", min=1)] = None,
    threads_per_worker: Annotated[Optional[int], typer.Option(help="with --ray: torch threads per worker "
                                                                   "(default: 1, or the CPUs shared out "
                                                                   "among --workers)", min=1)] = None,
) -> None:
    """Answer a competition batch file: per-test-case results with their duration (ms), resumable."""
    import time

    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from llmopt.batch.cases import load_batch
    from llmopt.batch.runner import DEFAULT_SYSTEM_PROMPT, BatchRun, RunOptions

    from llmopt.config import EngineConfig, parse_kv_budget, parse_speculative

    console, err = Console(), Console(stderr=True)
    t_start = time.perf_counter()
    kv = {"kv_policy": kv_policy, "kv_budget": parse_kv_budget(kv_budget), "kv_dtype": kv_dtype,
          "kv_quest_pin": kv_quest_pin, "speculative": parse_speculative(speculative),
          "num_speculative_tokens": num_speculative_tokens,
          "difficulty_probe": str(difficulty_probe) if difficulty_probe is not None else None}
    EngineConfig(**kv)  # a bad policy or budget: say so before loading anything
    if ray is None and (workers is not None or threads_per_worker is not None):
        raise ValueError("--workers and --threads-per-worker split the run across Ray workers: add --ray local "
                         "(or --ray HOST:PORT)")
    if ray is not None:
        from llmopt.distributed.cluster import require_ray

        require_ray()  # before anything slow: a missing extra is named at once
    batch = load_batch(cases)
    options = RunOptions(system=DEFAULT_SYSTEM_PROMPT if system is None else system, max_tokens=max_tokens,
                         concurrency=concurrency, temperature=temperature, top_p=top_p, seed=seed,
                         stop_at_answer=stop_at_answer, think_budget=think_budget, answer_budget=answer_budget,
                         early_exit=early_exit,
                         early_exit_threshold=early_exit_threshold, loop_exit=loop_exit,
                         think_budget_threshold=think_budget_threshold, think_budget_max=think_budget_max,
                         jump_forward=jump_forward, low_confidence_exit=low_confidence_exit,
                         think_gate=think_gate, think_gate_threshold=think_gate_threshold,
                         difficulty_exit=difficulty_exit, difficulty_exit_tokens=difficulty_exit_tokens,
                         difficulty_budget=difficulty_budget, difficulty_budget_threshold=difficulty_budget_threshold)
    run = BatchRun(batch, output, options, resume=resume)
    todo = run.pending_questions
    what = f"{len(batch.cases)} test cases" if batch.kind == "cases" else f"{len(batch.questions)} questions"
    err.print(f"{cases}: {what}; {todo} answers to compute, {batch.num_questions - todo} already done", highlight=False)

    if ray is not None and adapter is not None:
        raise typer.BadParameter("--adapter does not reach Ray workers yet: run without --ray, or use a registry "
                                 "model that carries its adapter (e.g. smollm2-135m-reasoning)", param_hint="--adapter")
    if ray is not None and todo:  # (nothing to compute: the plain path below rewrites OUT, no cluster needed)
        from llmopt.config import EngineConfig

        config = EngineConfig(max_num_seqs=max(EngineConfig.max_num_seqs, run.max_concurrency), dtype=dtype,
                              num_threads=threads_per_worker or threads or 1, **kv)
        summary, rs, load_s = run_on_ray(run, ray, model, quant, config, workers, threads_per_worker or threads,
                                         err)
        console.print(summary_table(summary, load_s, time.perf_counter() - t_start))
        if rs.workers:
            err.print(f"ray: {rs.workers} workers x {rs.threads} threads; {rs.replaced} replaced after dying "
                      f"(reran {len(rs.rerun)} tasks); Ray's own time per case: median "
                      f"{rs.overhead_median_ms:.2f} ms", highlight=False)
        return

    engine, load_s = None, None
    if todo:
        from llmopt.engine.engine import LLMEngine

        t0 = time.perf_counter()
        with err.status(f"loading {model}"):
            config = EngineConfig(max_num_seqs=max(EngineConfig.max_num_seqs, run.max_concurrency), dtype=dtype,
                                  num_threads=threads, **kv)
            engine = LLMEngine(model, config, quant=quant, adapter=str(adapter) if adapter is not None else None)
        load_s = time.perf_counter() - t0

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    try:
        with Progress(*columns, console=err, transient=True, disable=not todo) as progress:
            task = progress.add_task("answering", total=todo)

            def on_answer(case, out) -> None:
                progress.update(task, advance=1, description=f"case {case.id}" if case else "answering")

            def on_case(res) -> None:
                progress.console.print(f"case {res.id}: {len(res.results)} questions, {res.duration_ms:,.1f} ms, "
                                       f"{res.output_tokens} tokens", highlight=False)

            summary = run.run(engine, on_answer=on_answer, on_case=on_case)
    except KeyboardInterrupt:
        kept = output if batch.kind == "cases" else run.partial
        err.print(f"interrupted: finished work is in {kept}; run the same command again to resume", highlight=False)
        raise
    console.print(summary_table(summary, load_s, time.perf_counter() - t_start))


def run_on_ray(run: BatchRun, address: str, model: str, quant: str | None, config: EngineConfig,
               workers: int | None, threads: int | None, err: Console) -> tuple[RunSummary, RaySummary, float]:
    """``llmopt run --ray``: connect, start the workers, run what is pending, stop what was started."""
    from llmopt.batch.ray_runner import RayBatchRun, WorkerPool
    from llmopt.distributed.cluster import connect, plan_workers

    with err.status(f"connecting to Ray ({address})"):
        cluster = connect(address)
    try:
        n, t = plan_workers(cluster, workers, threads)
        config.num_threads = t
        with err.status(f"starting {n} Ray workers x {t} threads on {cluster.nodes} node(s), loading {model}"):
            pool = WorkerPool(model, config, quant, n, t)
        try:
            ray_run = RayBatchRun(run, pool, cluster)

            def on_case(res: CaseResult) -> None:
                err.print(f"case {res.id}: {len(res.results)} questions, {res.duration_ms:,.1f} ms, "
                          f"{res.output_tokens} tokens", highlight=False)

            try:
                summary = ray_run.run(on_case=on_case)
            except KeyboardInterrupt:
                kept = run.out if run.batch.kind == "cases" else run.partial
                err.print(f"interrupted: finished work is in {kept}; run the same command again to resume",
                          highlight=False)
                raise
            return summary, ray_run.summary, pool.startup_s
        finally:
            pool.close()
    finally:
        cluster.shutdown()
