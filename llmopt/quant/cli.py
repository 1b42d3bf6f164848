"""``llmopt quantize``: parses its options into a :class:`~llmopt.quant.recipe.QuantRecipe`, runs
it with progress bars (:func:`llmopt.quant.recipe.run`: quantize, measure, write a checkpoint that
``LLM(DIR)`` / ``llmopt generate DIR`` load) and prints the result.

The main CLI registers ``quantize_command`` lazily; heavy imports stay inside the function.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True, soft_wrap=True)

class _Bars:
    """rich progress on stderr; ``cb(label)`` gives a ``(done, total, what)`` callback."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TextColumn("[dim]{task.fields[what]}"), console=err, transient=True)
        self.tasks: dict[str, Any] = {}

    def __enter__(self):
        self.p.__enter__()
        return self

    def __exit__(self, *exc):
        return self.p.__exit__(*exc)

    def step(self, label: str):
        """A one-shot step shown as a 0/1 bar; returns a function that completes it."""
        tid = self.p.add_task(label, total=1, what="")
        return lambda: self.p.update(tid, completed=1)

    def cb(self, label: str):
        tid = self.p.add_task(label, total=None, what="")

        def update(done: int, total: int, what: str = "") -> None:
            self.p.update(tid, completed=done, total=total, what=what)

        return update


def quantize_command(
    model: Annotated[str, typer.Argument(help="registry name, Hugging Face directory or .gguf file")],
    output: Annotated[Path, typer.Option("--output", "-o", help="checkpoint directory to write (LLM(DIR) loads it)")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="int4, int3, int2, int8, fp8, fp4, w8a8, w4a8 (ignored with --bits)")] = "int4",
    group_size: Annotated[Optional[int], typer.Option("--group-size", "-g", help="weights per scale group along in_features (grouped formats; "
                                                                   "default 64; with --bits and no -g: chosen per linear among the native sizes)")] = None,
    method: Annotated[str, typer.Option(help="rtn (round to nearest), gptq or awq (calibrated; int2/3/4/8, w4a8)")] = "rtn",
    bits: Annotated[Optional[str], typer.Option(help="mixed precision per layer: an average like 3.5 (real bits per weight incl. "
                                                     "scales, over int2/int3/int4/int8) or a menu like 2,4,8 or int4:g32,int3:g64 "
                                                     "(target = mean of the menu)")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the measurements (and the mixed plan) to this JSON file")] = None,
    calib_seqs: Annotated[int, typer.Option(help="gptq/awq calibration sequences", min=1)] = 32,
    seq_len: Annotated[int, typer.Option(help="gptq/awq calibration sequence length in tokens", min=16)] = 512,
    sensitivity_est: Annotated[str, typer.Option("--sensitivity", help="mixed: fisher (Fisher estimate + re-measurement, fast) or kl "
                                                                     "(measured KL of each linear alone, slow)")] = "fisher",
    refine: Annotated[int, typer.Option(help="mixed (fisher): re-measurement rounds of the plan", min=0)] = 1,
    sens_seqs: Annotated[Optional[int], typer.Option(help="mixed: calibration sequences of the per-layer sensitivity "
                                                          "(default 16 for fisher, 4 for kl)", min=1)] = None,
    sens_len: Annotated[int, typer.Option(help="mixed: their length in tokens", min=16)] = 128,
    ppl_texts: Annotated[int, typer.Option(help="held-out texts scored for perplexity (0 = skip perplexity)", min=0)] = 8,
    ppl_tokens: Annotated[int, typer.Option(help="tokens scored per held-out text", min=16)] = 256,
    skip: Annotated[str, typer.Option(help="comma-separated substrings of module names kept in float (lm_head: see --lm-head)")] = "lm_head,embed",
    lm_head: Annotated[str, typer.Option("--lm-head", help="lm_head format (RTN, group --group-size): int8 (the engine's default), "
                                                          "another format, or float; overrides --skip for lm_head")] = "int8",
    embedding: Annotated[str, typer.Option(help="input embedding: auto (tied models: shares the quantized lm_head's tensors; "
                                                "untied: float), quantized (untied too, in the lm_head format), float")] = "auto",
    float_dtype: Annotated[str, typer.Option(help="storage of the float tensors (embeddings, norms): bfloat16, float16 or float32")] = "bfloat16",
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: all cores)", min=1)] = None,
    seed: Annotated[int, typer.Option(help="seed of the calibration windows")] = 0,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="reload the written checkpoint and check its logits are identical")] = True,
    force: Annotated[bool, typer.Option("--force", help="write into a non-empty output directory")] = False,
) -> None:
    """Quantize a model and write a checkpoint directory; prints size, compression vs BF16,
    held-out perplexity before/after and the time taken."""
    from .recipe import QuantRecipe, run

    recipe = QuantRecipe(model=model, output=output, fmt=fmt, group_size=group_size, method=method, bits=bits,
                         calib_seqs=calib_seqs, seq_len=seq_len, sensitivity_est=sensitivity_est, refine=refine,
                         sens_seqs=sens_seqs, sens_len=sens_len, ppl_texts=ppl_texts, ppl_tokens=ppl_tokens,
                         skip=skip, lm_head=lm_head, embedding=embedding, float_dtype=float_dtype, threads=threads,
                         seed=seed, verify=verify, force=force)
    result = run(recipe, progress=_Bars())
    result["command"] = "llmopt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    _print_table(result)
    if json_out is not None:
        json_out = Path(json_out)
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        err.print(f"wrote {json_out}")


def _print_table(r: dict[str, Any]) -> None:
    from rich.table import Table

    def mb(n: int) -> str:
        return f"{n / 1e6:.1f} MB ({n:,} B)"

    def ppl(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    title = f"{r['model']} -> {r['output']}: {r['format']} ({r['method']}, group {r['group_size']})"
    t = Table(title=title, show_header=True)
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row("bits per weight (quantized linears + embedding)",
              f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] else "-")
    t.add_row("lm_head / embedding", f"{r['lm_head_format'] or 'float'} / {r['embedding_format'] or 'float'}"
                                     + (" (shared)" if r["embedding_shared_with_lm_head"] else ""))
    t.add_row("bits per parameter (whole checkpoint)", f"{r['bits_per_weight_all_params']:.3f}")
    t.add_row("size of model.safetensors", mb(r["size_bytes"]))
    t.add_row("BF16 size (2 B x all parameters)", mb(r["bf16_bytes"]))
    t.add_row("compression vs BF16", f"{r['compression_vs_bf16']:.2f}x")
    t.add_row("perplexity before", ppl(r["ppl_before"]))
    t.add_row("perplexity after", ppl(r["ppl_after"]))
    if r["ppl_before"] and r["ppl_after"]:
        t.add_row("perplexity change", f"{100 * (r['ppl_after'] / r['ppl_before'] - 1):+.2f}%")
    if "plan_counts" in r:
        t.add_row("mixed plan", ", ".join(f"{k}: {v}" for k, v in r["plan_counts"].items()))
        t.add_row("target / achieved bits", f"{r['target_bits']:.3f} / "
                                            f"{r['plan_bits_per_weight']:.3f}")
    t.add_row("seconds", f"{r['seconds']:.1f} ({', '.join(f'{k} {v:.1f}' for k, v in r['seconds_by_phase'].items())})")
    out = console if console.is_terminal else Console(width=160)
    out.print(t)
