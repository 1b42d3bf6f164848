"""The ``llmopt`` command line: one thin function per command; the logic lives in the packages."""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from llmopt.models.registry import DEFAULT_MODEL, REGISTRY

app = typer.Typer(
    help="llmopt: run small open LLMs (Llama / Qwen2 / Qwen3; HF directories or GGUF) fast on CPUs, "
         "and measure them honestly.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err = Console(stderr=True, soft_wrap=True)

ModelArg = Annotated[str, typer.Argument(help=f"registry name (see `llmopt models`), Hugging Face directory or "
                                              f".gguf file; default {DEFAULT_MODEL}")]


def fail(msg: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {msg}", highlight=False, markup=True)
    raise typer.Exit(code)


def guarded(fn):
    """Turn the library's input errors into one clear line and a non-zero exit, never a traceback."""
    import functools

    from llmopt.config import ModelLoadError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ModelLoadError, ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
            fail(str(e).replace("[", "\\["))
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log what the library does")] = False):
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


@app.command()
@guarded
def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Argument(help="the prompt text (a user message unless --no-chat)")],
    max_tokens: Annotated[int, typer.Option(help="most new tokens", min=1)] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy", min=0.0)] = 0.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass", min=0.0, max=1.0)] = 1.0,
    top_k: Annotated[int, typer.Option(help="sample among the k best tokens (0 = off)", min=0)] = 0,
    seed: Annotated[Optional[int], typer.Option(help="sampling seed")] = None,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="apply the model's chat template")] = True,
    quant: Annotated[Optional[str], typer.Option(help="quantize on load: int8, int4, ... (RTN); fp32: float (a .gguf dequantized); default: as stored (a .gguf runs on its own blocks; activations: LLMOPT_GGUF_ACT=by-kind (default: prompt fp32, generated int8), fp32 or int8)")] = None,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
):
    """Generate text for one prompt and print it, with timings."""
    from llmopt import LLM, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    with err.status(f"loading {model}"):
        llm = LLM(model, quant=quant, dtype=dtype)
    out = (llm.chat([{"role": "user", "content": prompt}], params) if chat else llm.generate([prompt], params))[0]
    console.print(out.text, highlight=False, markup=False)
    m = out.metrics
    total = (m.finish_time or m.arrival_time) - m.arrival_time
    err.print(f"[dim]{len(out.prompt_token_ids)} prompt + {len(out.token_ids)} generated tokens, "
              f"finish={out.finish_reason}, load {llm.engine.loaded.load_seconds:.2f}s, "
              f"TTFT {1000 * (m.ttft or 0):.0f} ms, {len(out.token_ids) / max(total, 1e-9):.1f} tok/s[/]")


@app.command()
def models():
    """List the embedded (registry) models and whether each is installed."""
    t = Table(title="llmopt registry")
    for col in ("name", "installed", "path / how to install", "description"):
        t.add_column(col)
    for e in REGISTRY.values():
        p = e.path()
        t.add_row(e.name, "yes" if p else "no", str(p) if p else e.install_command, e.description)
    console.print(t)


# Commands whose logic lives in a package: (command name, module, function). Each module keeps its
# heavy imports inside the function so that `llmopt --help` stays fast.
_COMMANDS = [
    ("run", "llmopt.batch.cli", "run_command"),
    ("bench", "llmopt.bench.cli", "bench_command"),
    ("eval", "llmopt.tasks.cli", "eval_command"),
    ("report", "llmopt.tasks.cli", "report_command"),
    ("quantize", "llmopt.quant.cli", "quantize_command"),
    ("serve", "llmopt.serve.cli", "serve_command"),
]


class CommandImportError(RuntimeError):
    """A subcommand's module is missing or broken: an install problem, reported instead of hidden."""


def _register() -> None:
    """Register every subcommand. A module that does not import (or lacks its function) stops the
    CLI with an error naming the command, the module and the cause: a command never silently
    disappears from ``llmopt --help``."""
    import importlib

    for name, module, attr in _COMMANDS:
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise CommandImportError(
                f"llmopt: the '{name}' command cannot be loaded: {module}.{attr} failed with "
                f"{type(e).__name__}: {e}. Reinstall llmopt with its dependencies (pip install -e .) "
                "or fix the import") from e
        app.command(name)(guarded(fn))

    try:  # command groups
        from llmopt.train.cli import train_app
    except ImportError:
        return
    app.add_typer(train_app, name="train")


_register()


def run() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
