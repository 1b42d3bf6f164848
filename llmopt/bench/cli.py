"""``llmopt bench``: a thin typer command over :mod:`llmopt.bench.grid`. The main CLI registers
``bench_command``; rich output (status line, table) lives here and only here."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()
err = Console(stderr=True)

DEFAULT_MODEL = "smollm2-135m-instruct"


def results_table(result: dict[str, Any], title: str | None = None) -> Table:
    """The bench table: one row per (cell, system); ratios are against the reference system."""
    from .grid import TABLE_COLUMNS, _threads, quality_note, table_rows

    m = result["machine"]
    kern = m.get("kernels") or {}
    bf3 = (", prompt rows on AMX-BF16" if kern.get("prompt_bf16x3")
           else ", prompt rows int16" if kern.get("prompt_int16") else "")
    where = f", GGUF kernels {kern['gguf_path']} (prefetch {kern['prefetch']}{bf3})" if kern else ""
    t = Table(title=title or f"{result['model']['name']}: {_threads(m['threads'])}, {m['cpu_model']}{where}",
              caption=f"ref = {result['settings']['reference']}; "
                      + ("same greedy tokens n/a = a peer with its own arithmetic (not a correctness check); "
                         if result["settings"].get("peers") else "")
                      + quality_note(result)
                      + "peak RSS = high-water RSS of the process that runs only that system, during the run; "
                      "timings on a shared machine are noisy")
    for col in TABLE_COLUMNS:
        t.add_column(col, justify="left" if col == "system" else "right")
    last = None
    for row in table_rows(result):
        if last is not None and row[:2] != last:
            t.add_section()
        last = row[:2]
        t.add_row(*(escape(c) for c in row))  # "llmopt[int4]" is not rich markup
    return t


def save_json(result: dict[str, Any], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def bench_command(
    model: Annotated[str, typer.Argument(help="registry name, Hugging Face directory or .gguf file")] = DEFAULT_MODEL,
    concurrency: Annotated[str, typer.Option(help="comma-separated numbers of requests that arrive at once")] = "1,4,16",
    input_len: Annotated[str, typer.Option(help="comma-separated prompt lengths in tokens (random ids, seeded)")] = "128",
    output_len: Annotated[str, typer.Option(help="comma-separated output lengths in tokens (greedy, EOS ignored)")] = "128",
    threads: Annotated[Optional[int], typer.Option(help="torch/OpenMP threads per system (default: all cores)", min=1)] = None,
    baseline: Annotated[str, typer.Option(help="hf: transformers generate on the same weights, side by side; none: llmopt only")] = "hf",
    quant: Annotated[Optional[str], typer.Option(help="extra llmopt rows quantized on load, e.g. int8,int4 (needs llmopt.quant.linear)")] = None,
    peer: Annotated[Optional[str], typer.Option(help="other engines side by side on the same GGUF file: llamacpp (needs pip install 'llmopt\\[llamacpp]'; skipped with a message if missing)")] = None,
    repeat: Annotated[int, typer.Option(help="measured runs per cell and system (order alternates between runs)", min=1)] = 1,
    warmup: Annotated[bool, typer.Option("--warmup/--no-warmup", help="a short run of each cell's shape before measuring it")] = True,
    seed: Annotated[int, typer.Option(help="seed of the random prompts")] = 0,
    kv_dtype: Annotated[Optional[str], typer.Option(help="the llmopt rows' KV cache type: float16 (half the bytes of a float32 cache, llama.cpp's default), int8 or fp8 (default: the model's dtype); their held-out perplexity is then scored through the cache")] = None,
    quality: Annotated[bool, typer.Option("--quality/--no-quality", help="score every system once on the held-out texts first: its bits per weight and held-out perplexity in every row (the weights its speed was measured on)")] = True,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write every cell, both systems, ratios and machine info to this JSON file")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="also print the table as Markdown (for a README)")] = False,
) -> None:
    """Throughput, TTFT, TPOT, prefill and peak memory over concurrency x input x output length,
    llmopt against the unoptimized original (transformers) and optional peers (llama.cpp), side by
    side in one run."""
    from .grid import (
        GridConfig,
        check_quant_available,
        markdown_table,
        parse_int_list,
        peer_problems,
        product_cells,
        run_grid,
    )

    quants = [q.strip() for q in quant.split(",") if q.strip()] if quant else []
    check_quant_available(quants)  # fail before loading anything
    cells = product_cells(parse_int_list(concurrency, "--concurrency"), parse_int_list(input_len, "--input-len"),
                          parse_int_list(output_len, "--output-len"))
    peers = list(dict.fromkeys(p.strip() for p in peer.split(",") if p.strip())) if peer else []
    from llmopt.config import usable_cpus

    config = GridConfig(model=model, cells=cells, threads=threads or usable_cpus(), baseline=baseline,
                        quants=quants, peers=peers, repeat=repeat, warmup=warmup, seed=seed, quality=quality,
                        kv_dtype=kv_dtype)
    for name, why in peer_problems(peers, model).items():
        err.print(f"[yellow]skipping {name}:[/yellow] {escape(why)}")
    command = "llmopt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with err.status("starting") as status:
        result = run_grid(config, progress=lambda msg: status.update(msg), command=command)
    out = console if console.is_terminal else Console(width=200)  # piped: do not wrap the table at 80 columns
    out.print(results_table(result))
    if markdown:
        out.print(markdown_table(result), highlight=False, markup=False, soft_wrap=True)
    if json_out is not None:
        save_json(result, json_out)
        err.print(f"wrote {json_out}")
