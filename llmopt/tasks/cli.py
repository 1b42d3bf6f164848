"""``llmopt eval`` and ``llmopt report``: thin typer commands over llmopt.tasks and
llmopt.report. The main CLI registers ``eval_command`` and ``report_command``; rich output
(progress bars, tables) lives here and only here."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.markup import escape
from rich.table import Table

from .base import DEFAULT_MODEL, SUITE_NAMES

console = Console()
err = Console(stderr=True)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _ci(pair: Any, digits: int = 3) -> str:
    return f"[{_fmt(pair[0], digits)}, {_fmt(pair[1], digits)}]" if pair else "-"


def results_table(run: dict[str, Any], title: str) -> Table:
    """The per-suite table of one eval run."""
    from llmopt.report.build import SUITE_HEADER, suite_rows

    t = Table(title=escape(title))
    for col in SUITE_HEADER:
        t.add_column(col, justify="left" if col in ("suite", "metric") else "right")
    for row in suite_rows(run):
        t.add_row(*row)
    return t


def deltas_table(comparison: dict[str, Any]) -> Table:
    t = Table(title="candidate - baseline (same items)")
    for col in ("suite", "metric", "candidate", "baseline", "delta", "95% CI", "McNemar p"):
        t.add_column(col, justify="left" if col in ("suite", "metric") else "right")
    for suite, d in comparison["deltas"].items():
        digits = 2 if d["metric"] == "ppl" else 3
        t.add_row(suite, d["metric"], _fmt(d["candidate"], digits), _fmt(d["baseline"], digits),
                  _fmt(d["delta"], digits), _ci(d["delta_ci95"], digits),
                  _fmt(d.get("mcnemar", {}).get("p_value")))
    return t


def _invocation() -> str:
    """The command line as typed: ``llmopt ...``, or ``python -m llmopt.tasks.cli ...``."""
    prog = "llmopt"
    if sys.argv and sys.argv[0].endswith(("tasks/cli.py", "tasks\\cli.py")):
        prog = "python -m llmopt.tasks.cli"
    return " ".join([prog, *(shlex.quote(a) for a in sys.argv[1:])])


def _run_one(model: str, quant: Optional[str], config: Any, command: str,
             adapter: Optional[str] = None) -> dict[str, Any]:
    from dataclasses import replace

    from .evaluate import engine_kwargs, load_llm, run_eval

    cfg = replace(config, model=model, quant=quant, adapter=adapter)
    with err.status(escape(f"loading {model} (quant={quant or 'none'})")):
        llm = load_llm(model, quant, adapter, **engine_kwargs(cfg))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        tasks: dict[str, Any] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if not err.is_terminal and (done == total or stage == "generate"):
                # no live bar in a log file: one line per generated batch and finished stage
                err.print(escape(f"{model} [{quant or 'none'}] {stage}: {done}/{total}"),
                          highlight=False)
            if stage not in tasks:
                tasks[stage] = progress.add_task(escape(f"{model} [{quant or 'none'}] {stage}"),
                                                 total=total)
            progress.update(tasks[stage], completed=done, total=total)

        return run_eval(llm, cfg, progress=on_progress, command=command)


def eval_command(
    model: Annotated[str, typer.Argument(help="registry name, Hugging Face directory or .gguf file")] = DEFAULT_MODEL,
    suite: Annotated[str, typer.Option("--suite", help=f"comma-separated suites: {','.join(SUITE_NAMES)} (or 'all'); rg:TASK for any reasoning-gym task (rg:gcd, rg:gcd+lcm)")] = "math,logic,code,format",
    quant: Annotated[Optional[str], typer.Option(help="quantize on load: int8, int4, ...; fp32: float (a .gguf dequantized); default: as stored (a .gguf runs on its own blocks)")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="LoRA adapter merged at load (`llmopt train`'s OUT/adapter.safetensors); --compare's baseline runs without it")] = None,
    n: Annotated[int, typer.Option("--n", help="items per suite", min=1)] = 20,
    seed: Annotated[int, typer.Option(help="seed that picks the items (and sampling seeds)")] = 0,
    samples: Annotated[int, typer.Option(help="samples per item; more than 1 reports pass@k", min=1)] = 1,
    temperature: Annotated[Optional[float], typer.Option(help="default: 0 (greedy) for 1 sample, 0.8 for more", min=0.0)] = None,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass", min=0.0, max=1.0)] = 1.0,
    max_tokens: Annotated[int, typer.Option(help="most new tokens per answer", min=1)] = 512,
    batch_size: Annotated[int, typer.Option(help="prompts handed to the engine at once", min=1)] = 8,
    shots: Annotated[int, typer.Option(help="few-shot demos per prompt, in the answer format", min=0)] = 0,
    ppl_max_tokens: Annotated[int, typer.Option(help="tokens scored per perplexity document", min=2)] = 512,
    code_timeout: Annotated[float, typer.Option(help="seconds per HumanEval program in the sandbox", min=0.1)] = 10.0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write suites and every item to this JSON file")] = None,
    compare: Annotated[Optional[str], typer.Option("--compare", help="baseline to run on the same items: 'fp32', 'quant=int8' or 'model=PATH,quant=none'")] = None,
    think_budget: Annotated[Optional[int], typer.Option(help="close <think> after this many tokens (docs/reasoning.md)", min=1)] = None,
    answer_budget: Annotated[Optional[int], typer.Option(help="close <answer> this many tokens after thinking the engine closed (tags included; the model's own answers are not capped)", min=1)] = None,
    early_exit: Annotated[bool, typer.Option("--early-exit", help="stop thinking when a trial answer at a pause is confident")] = False,
    early_exit_threshold: Annotated[Optional[float], typer.Option(help="mean token probability a trial answer needs, (0, 1]")] = None,
    loop_exit: Annotated[bool, typer.Option("--loop-exit", help="close <think> when it starts repeating itself (a greedy loop)")] = False,
    low_confidence_exit: Annotated[Optional[float], typer.Option(help="close <think> in place of a think token the model chose with a probability below this, in (0, 1) (docs/reasoning.md)")] = None,
    think_gate: Annotated[Optional[int], typer.Option(help="after this many think tokens close <think> if the model was unsure of them (geometric-mean probability below --think-gate-threshold; docs/reasoning.md)", min=1)] = None,
    think_gate_threshold: Annotated[Optional[float], typer.Option(help="with --think-gate: the geometric-mean token probability below which thinking is closed, in (0, 1) (default 0.86)")] = None,
    difficulty_exit: Annotated[Optional[float], typer.Option(help="close <think> at --difficulty-exit-tokens think tokens for items the model's difficulty probe gives a chance of a wrong answer above this, in (0, 1) (docs/reasoning.md)")] = None,
    difficulty_exit_tokens: Annotated[Optional[int], typer.Option(help="with --difficulty-exit: think tokens an item judged hard gets (default 16)", min=1)] = None,
    difficulty_budget: Annotated[Optional[int], typer.Option(help="a second tier (looser: a lower threshold, more tokens; or stricter: a higher threshold, fewer tokens): cap thinking at this many tokens for items the difficulty probe gives P(wrong) above --difficulty-budget-threshold", min=1)] = None,
    difficulty_budget_threshold: Annotated[Optional[float], typer.Option(help="with --difficulty-budget: the P(wrong) above which it applies, in (0, 1) (default 0.8)")] = None,
    difficulty_probe: Annotated[Optional[Path], typer.Option(help="difficulty probe file (`llmopt train probe`; default: the model's own, if it ships one)")] = None,
    prefill_think: Annotated[bool, typer.Option("--prefill-think", help="end each prompt with '<think>\\n' (for a model that does not open <think> itself)")] = False,
    guided: Annotated[bool, typer.Option("--guided", help="decode with the think/answer format grammar (guided decoding, the 'guided' extra): format by construction; run without it for the unguided numbers")] = False,
    long_lengths: Annotated[str, typer.Option(help="passkey/needle prompt lengths in tokens, comma-separated (n items per length x depth)")] = "1024,2048,4096,8192",
    long_depths: Annotated[str, typer.Option(help="passkey/needle depths in [0, 1], comma-separated")] = "0,0.25,0.5,0.75,1",
    long_ppl_tokens: Annotated[int, typer.Option(help="tokens per longppl window", min=2)] = 4096,
    kv_policy: Annotated[str, typer.Option(help="KV policy: full, streaming, snapkv, h2o (free blocks) or quest (sparse reads) (docs/long_context.md)")] = "full",
    kv_budget: Annotated[Optional[str], typer.Option(help="KV budget: a fraction of the prompt (0.25) or a token count (2048)")] = None,
    kv_dtype: Annotated[Optional[str], typer.Option(help="KV cache element type: float16 (half the bytes of a float32 cache, llama.cpp's default), int8 or fp8 (e4m3) (default: the model's dtype)")] = None,
    kv_quest_pin: Annotated[float, typer.Option(help="quest: the fraction of each decode step's block budget pinned to the blocks the prompt's last 32 tokens attended to most (0.25 measured best; 0 = plain Quest; docs/long_context.md 2b)", min=0.0, max=1.0)] = 0.0,
    speculative: Annotated[str, typer.Option(help="speculative decoding of greedy answers: 'ngram' (the same answers in fewer steps: changes JCT, not accuracy) or 'off'")] = "off",
) -> None:
    """Accuracy, format score and perplexity on offline suites, with 95% intervals."""
    from llmopt.config import parse_kv_budget, parse_speculative

    from .evaluate import EvalConfig, compare_runs, parse_numbers, parse_spec, parse_suites, save_json

    command = _invocation()
    config = EvalConfig(model=model, quant=quant, suites=parse_suites(suite), n=n, seed=seed,
                        samples=samples, temperature=temperature, top_p=top_p,
                        max_tokens=max_tokens, batch_size=batch_size, shots=shots,
                        ppl_max_tokens=ppl_max_tokens, code_timeout_s=code_timeout, guided=guided,
                        think_budget=think_budget, answer_budget=answer_budget, early_exit=early_exit,
                        early_exit_threshold=early_exit_threshold, loop_exit=loop_exit, prefill_think=prefill_think,
                        low_confidence_exit=low_confidence_exit, think_gate=think_gate,
                        think_gate_threshold=think_gate_threshold, difficulty_exit=difficulty_exit,
                        difficulty_exit_tokens=difficulty_exit_tokens, difficulty_budget=difficulty_budget,
                        difficulty_budget_threshold=difficulty_budget_threshold,
                        difficulty_probe=str(difficulty_probe) if difficulty_probe is not None else None,
                        long_lengths=parse_numbers(long_lengths, int, "--long-lengths"),
                        long_depths=parse_numbers(long_depths, float, "--long-depths"),
                        long_ppl_tokens=long_ppl_tokens, kv_policy=kv_policy, kv_budget=parse_kv_budget(kv_budget),
                        kv_dtype=kv_dtype, kv_quest_pin=kv_quest_pin,
                        speculative=parse_speculative(speculative))
    run = _run_one(model, quant, config, command, str(adapter) if adapter is not None else None)
    console.print(results_table(run, f"{model} [{quant or 'none'}]{' guided' if guided else ''}: n={n}, seed={seed}"))
    result: dict[str, Any] = run
    if compare is not None:
        base_model, base_quant = parse_spec(compare, model)
        baseline = _run_one(base_model, base_quant, config, command)
        console.print(results_table(baseline, f"baseline {base_model} [{base_quant or 'none'}]"))
        result = compare_runs(run, baseline)
        console.print(deltas_table(result))
    if json_out is not None:
        save_json(result, json_out)
        err.print(f"wrote {json_out}")


def report_command(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories or JSON files from `llmopt eval --json` / `llmopt bench`")],
    out: Annotated[Path, typer.Option("-o", "--out", help="directory for report.md, report.html and figures/")] = Path("report"),
) -> None:
    """Markdown and HTML report with plots from saved runs."""
    from llmopt.report.build import build_report

    command = _invocation()
    files = build_report(run_dirs, out, command=command)
    console.print(f"wrote {files.markdown}, {files.html} and {len(files.figures)} figures")


def _standalone_app() -> typer.Typer:  # pragma: no cover - for trying the commands alone
    app = typer.Typer(add_completion=False)
    app.command("eval")(eval_command)
    app.command("report")(report_command)
    return app


if __name__ == "__main__":  # pragma: no cover
    _standalone_app()()
