"""``llmopt train sft``, ``llmopt train grpo`` and ``llmopt train probe``: typer commands over ``llmopt.train``.

Heavy imports (torch, PEFT, the engine) stay inside the commands so that ``llmopt --help``
stays fast. Bad input exits non-zero with one line that says what to change.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer

train_app = typer.Typer(
    help="Fine-tune a model to answer in <think>...</think><answer>...</answer> and get more right: "
         "SFT (gold targets or STaR rejection sampling) and GRPO on llmopt's engine, LoRA, fp32 on CPU. "
         "Runs resume from their newest complete checkpoint (same command again); the result is "
         "OUT/adapter.safetensors, loadable with llmopt.models.adapter. `train probe` fits a difficulty probe "
         "(P(wrong) from the prompt) for --difficulty-exit.",
    no_args_is_help=True,
)

DEFAULT_MODEL = "smollm2-135m-instruct"


def _guarded(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from rich.console import Console

        from llmopt.config import ModelLoadError

        err = Console(stderr=True)
        import signal

        def on_term(signum, frame):  # `kill` saves like Ctrl-C does
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            return fn(*args, **kwargs)
        except (ModelLoadError, ValueError, FileNotFoundError) as e:
            err.print(f"[bold red]error:[/] {str(e).replace('[', chr(92) + '[')}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted: the last finished step is saved; run the same command to resume")
            raise typer.Exit(130) from None
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


def _progress(total_key: str = "total_steps"):
    """A rich progress bar fed by the trainers' per-step records."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    state: dict = {}

    def update(rec: dict) -> None:
        if "task" not in state:
            state["task"] = bar.add_task("train", total=rec[total_key], completed=rec["step"] - 1, info="")
        info = " ".join(f"{k}={rec[k]:.3g}" for k in ("loss", "reward", "format_rate", "accuracy", "kl",
                                                       "tokens_per_s", "rollout_tokens_per_s") if k in rec)
        bar.update(state["task"], completed=rec["step"], info=info)

    return bar, update


@train_app.command("sft")
@_guarded
def sft_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory: checkpoints, log.jsonl, adapter.safetensors; "
                                                         "an existing run there is resumed")],
    model: Annotated[str, typer.Option(help="base model: registry name, HF directory or .gguf")] = DEFAULT_MODEL,
    suites: Annotated[str, typer.Option(help="training questions per suite from the generators (training seeds, "
                                             "disjoint from eval): math=N,logic=N,code=N; rg:TASK=N for any "
                                             "reasoning-gym task")] = "math=50,logic=50,code=30",
    data: Annotated[Optional[Path], typer.Option(help="JSONL of your own {question, answer, rationale?} instead "
                                                      "of --suites")] = None,
    chunk: Annotated[int, typer.Option(help="block of training seeds to draw from", min=0)] = 0,
    init_adapter: Annotated[Optional[Path], typer.Option(help="continue from this adapter (same base model "
                                                              "and LoRA layout)")] = None,
    targets: Annotated[str, typer.Option(help="gold: gold answer with a short rationale; star: the model's own "
                                              "verifier-accepted samples from a few-shot prompt; both: star, else gold")] = "gold",
    systems: Annotated[str, typer.Option(help="system prompts to train under, in turn: reasoning (the competition's), "
                                              "none, code")] = "reasoning,none,code",
    epochs: Annotated[int, typer.Option(help="passes over the data")] = 1,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 5e-4,
    lr_schedule: Annotated[str, typer.Option(help="constant, or cosine (decays to 0.1 x lr at the last step)")] = "constant",
    warmup_steps: Annotated[int, typer.Option(help="optimizer steps of linear learning-rate warm-up", min=0)] = 3,
    grad_accum: Annotated[int, typer.Option(help="sequences per optimizer step")] = 4,
    max_seq_tokens: Annotated[int, typer.Option(help="skip examples longer than this (prompt + target)")] = 384,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank")] = 16,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha (scale = alpha / rank)")] = 32.0,
    lora_first_layer: Annotated[int, typer.Option(help="LoRA on layers from this one up (fewer = faster backward)")] = 18,
    save_every: Annotated[int, typer.Option(help="optimizer steps between checkpoints")] = 5,
    samples_per_prompt: Annotated[int, typer.Option(help="STaR: samples per question")] = 4,
    seed: Annotated[int, typer.Option(help="shuffling, LoRA init and sampling seed")] = 0,
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: all cores)")] = None,
):
    """Supervised fine-tuning (LoRA): teach the format with gold targets or STaR-distilled samples."""
    from llmopt.train.common import LoraSpec
    from llmopt.train.sft import SFTConfig, run_sft

    if init_adapter is not None and not init_adapter.is_file():
        raise FileNotFoundError(f"--init-adapter {str(init_adapter)!r} does not exist")
    cfg = SFTConfig(model=model, out=str(out), suites=suites, data=str(data) if data else None, chunk=chunk,
                    init_adapter=str(init_adapter) if init_adapter else None,
                    targets=targets, systems=systems, epochs=epochs, lr=lr, lr_schedule=lr_schedule,
                    warmup_steps=warmup_steps, grad_accum=grad_accum,
                    max_seq_tokens=max_seq_tokens, save_every=save_every, seed=seed,
                    samples_per_prompt=samples_per_prompt, num_threads=threads,
                    lora=LoraSpec(rank=lora_rank, alpha=lora_alpha, first_layer=lora_first_layer))
    cfg.validate()
    bar, update = _progress()
    with bar:
        path = run_sft(cfg, progress=update)
    typer.echo(f"adapter: {path}")


@train_app.command("grpo")
@_guarded
def grpo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory (resumed if it holds a run)")],
    model: Annotated[str, typer.Option(help="base model: registry name, HF directory or .gguf")] = DEFAULT_MODEL,
    init_adapter: Annotated[Optional[Path], typer.Option(help="start from this adapter (e.g. SFT's "
                                                              "OUT/adapter.safetensors); same base model")] = None,
    suites: Annotated[str, typer.Option(help="training questions per suite: math=N,logic=N,code=N; rg:TASK=N for any reasoning-gym task")] = "math=40,logic=40,code=20",
    chunk: Annotated[int, typer.Option(help="block of training seeds (SFT uses 0 by default)", min=0)] = 1,
    systems: Annotated[str, typer.Option(help="system prompts in turn: reasoning, none, code")] = "reasoning,none",
    steps: Annotated[int, typer.Option(help="GRPO steps")] = 10,
    prompts_per_step: Annotated[int, typer.Option(help="questions per step")] = 2,
    group_size: Annotated[int, typer.Option(help="rollouts per question (G); advantages are relative to the group")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="most tokens per rollout")] = 96,
    temperature: Annotated[float, typer.Option(help="rollout sampling temperature")] = 1.0,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 1e-4,
    clip_eps: Annotated[float, typer.Option(help="PPO ratio clip epsilon")] = 0.2,
    beta: Annotated[float, typer.Option(help="KL-to-reference weight (0 = no reference pass)")] = 0.04,
    format_weight: Annotated[float, typer.Option(help="reward for the exact output format")] = 0.5,
    correct_weight: Annotated[float, typer.Option(help="reward for a correct answer")] = 1.0,
    length_penalty: Annotated[float, typer.Option(help="minus this times (tokens / max_new_tokens)")] = 0.0,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank (a fresh LoRA on top of --init-adapter merged)")] = 16,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha")] = 32.0,
    lora_first_layer: Annotated[int, typer.Option(help="LoRA on layers from this one up")] = 18,
    save_every: Annotated[int, typer.Option(help="steps between checkpoints")] = 5,
    seed: Annotated[int, typer.Option(help="rollout seeds and LoRA init")] = 0,
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: all cores)")] = None,
):
    """GRPO: group rollouts from llmopt's engine, grader rewards, clipped ratio, KL to the starting policy
    (the base model with --init-adapter merged)."""
    from llmopt.train.common import LoraSpec
    from llmopt.train.grpo import GRPOConfig, run_grpo
    from llmopt.train.rewards import RewardConfig

    cfg = GRPOConfig(model=model, out=str(out), init_adapter=str(init_adapter) if init_adapter else None,
                     suites=suites, chunk=chunk, systems=systems, steps=steps, prompts_per_step=prompts_per_step,
                     group_size=group_size, max_new_tokens=max_new_tokens, temperature=temperature, lr=lr,
                     clip_eps=clip_eps, beta=beta, save_every=save_every, seed=seed, num_threads=threads,
                     lora=LoraSpec(rank=lora_rank, alpha=lora_alpha, first_layer=lora_first_layer),
                     reward=RewardConfig(format_weight, correct_weight, length_penalty))
    cfg.validate()
    if init_adapter is not None and not init_adapter.is_file():
        raise FileNotFoundError(f"--init-adapter {str(init_adapter)!r} does not exist: give an adapter.safetensors "
                                "written by `llmopt train sft`")
    bar, update = _progress()
    with bar:
        path = run_grpo(cfg, progress=update)
    typer.echo(f"adapter: {path}")


@train_app.command("probe")
@_guarded
def probe_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="the probe file to write (.safetensors); its answers are "
                                                         "kept beside it in OUT.records/ (reused by a rerun)")],
    model: Annotated[str, typer.Option(help="the model the probe is for: registry name, HF directory or .gguf")] = "smollm2-135m-reasoning",
    seeds: Annotated[str, typer.Option(help="eval-item seeds to learn from, comma-separated (evaluate the probe on "
                                            "other seeds)")] = "9004,9008",
    suites: Annotated[str, typer.Option(help="graded reasoning suites: math, logic, rg:TASK (comma-separated)")] = "math,logic",
    n: Annotated[int, typer.Option(help="items per suite and seed", min=1)] = 200,
    think_tokens: Annotated[int, typer.Option(help="examples are the outputs still thinking after this many tokens "
                                                   "(the ones a difficulty exit could cut; 24 for an exit at 16-24)",
                                              min=1)] = 24,
    l2: Annotated[float, typer.Option(help="L2 penalty of the logistic regression (on standardized states)")] = 10.0,
    max_tokens: Annotated[int, typer.Option(help="most tokens per answer (unlimited thinking up to this)", min=2)] = 512,
    concurrency: Annotated[int, typer.Option(help="answers generated together", min=1)] = 16,
    quant: Annotated[Optional[str], typer.Option(help="run the model in this format (default: its own)")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="a LoRA adapter merged at load (the probe is then for "
                                                         "that model)")] = None,
    records_dir: Annotated[Optional[Path], typer.Option(help="where answers and prompt states are kept per seed "
                                                            "(default OUT.records/; runs may share one)")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: all cores)")] = None,
):
    """Fit a difficulty probe: P(wrong answer) from the prompt's last hidden state, for
    SamplingParams(difficulty_exit=...) / --difficulty-exit (docs/reasoning.md)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Table

    from llmopt.train.probe import ProbeConfig, run_probe

    try:
        seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers, got {seeds!r}") from None
    if adapter is not None and not adapter.is_file():
        raise FileNotFoundError(f"--adapter {str(adapter)!r} does not exist")
    cfg = ProbeConfig(model=model, out=str(out), seeds=seed_list,
                      suites=tuple(s.strip() for s in suites.split(",") if s.strip()), n=n,
                      think_tokens=think_tokens, l2=l2, max_tokens=max_tokens, concurrency=concurrency, quant=quant,
                      adapter=str(adapter) if adapter else None, num_threads=threads,
                      records_dir=str(records_dir) if records_dir else None)
    bar = Progress(TextColumn("answering"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), TimeRemainingColumn())
    task = bar.add_task("answer", total=None)
    with bar:
        path, summary = run_probe(cfg, progress=lambda done, total: bar.update(task, completed=done, total=total))
    table = Table(title=f"difficulty probe examples (thinking after {think_tokens} tokens)")
    for col in ("seed", "items", "right", "examples", "wrong", "AUC, seed left out"):
        table.add_column(col, justify="right")
    for seed, row in summary["seeds"].items():
        table.add_row(str(seed), str(row["items"]), str(row["right"]), str(row["examples"]), str(row["wrong"]),
                      f"{row['auc_left_out']:.3f}" if "auc_left_out" in row else "-")
    Console().print(table)
    typer.echo(f"training AUC {summary['auc_train']:.3f}; probe: {path}")
