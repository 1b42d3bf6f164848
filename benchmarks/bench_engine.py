"""The engine numbers quoted in the README: llmopt vs transformers on SmolLM2-135M-Instruct, fp32.

    .venv/bin/python benchmarks/bench_engine.py [--threads 2] [--repeat 3] [--out benchmarks/results/engine_bench.json]
    make bench

Two cells, each run for llmopt and for the unoptimized original (transformers ``generate`` on the
same weights, batched at the same concurrency) side by side in one run, through the same code as
``llmopt bench`` (method in ``llmopt/bench/grid.py``):

- single-stream decode: concurrency 1, 128 prompt tokens, 128 output tokens;
- 16 concurrent requests of 128 in / 128 out, all arriving at once (end-to-end output tok/s).

Prints the table, writes every number plus machine info and git commit to the JSON file, and ends
with the README-ready Markdown table. Targets (checked on a quiet machine, reported, never
asserted): single-stream decode >= 2x transformers, 16-way output tok/s >= 1.5x transformers.
Timings on a shared machine are noisy; the ratios are the numbers to quote.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console

from llmopt.bench.cli import results_table, save_json
from llmopt.bench.grid import Cell, GridConfig, markdown_table, run_grid

MODEL = "smollm2-135m-instruct"
CELLS = [Cell(concurrency=1, input_len=128, output_len=128), Cell(concurrency=16, input_len=128, output_len=128)]
TARGETS = {  # (concurrency, ratio key, minimum, what it is)
    1: ("stream_decode_tokens_per_s_x", 2.0, "single-stream decode tok/s"),
    16: ("output_tokens_per_s_x", 1.5, "16-way end-to-end output tok/s"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="measured runs per cell and system")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--output-len", type=int, default=None, help="override 128 (for a quick check of the script)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "engine_bench.json")
    args = ap.parse_args()

    cells = CELLS if args.output_len is None else [Cell(c.concurrency, c.input_len, args.output_len) for c in CELLS]
    err = Console(stderr=True)
    config = GridConfig(model=args.model, cells=cells, threads=args.threads, baseline="hf", repeat=args.repeat)
    command = "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:])
    with err.status("starting") as status:
        result = run_grid(config, progress=lambda msg: status.update(msg), command=command)
    out = Console()
    out = out if out.is_terminal else Console(width=200)  # piped: do not wrap the table at 80 columns
    out.print(results_table(result))
    save_json(result, args.out)
    err.print(f"wrote {args.out}")

    for cell in result["cells"]:
        key, need, what = TARGETS.get(cell["concurrency"], (None, None, None))
        if key is None:
            continue
        got = cell["ratios"]["llmopt"][key]
        verdict = "meets" if got is not None and got >= need else "misses"
        err.print(f"{what}: llmopt / transformers = {got}x ({verdict} the >= {need}x target on this run)")
    ld = result["machine"]
    if max(ld["load_average_start"][0], ld["load_average_end"][0]) > 0.5 * (ld["cpu_count"] or 1):
        err.print(f"[yellow]note:[/] the load average was {ld['load_average_start'][0]} -> {ld['load_average_end'][0]} "
                  f"on {ld['cpu_count']} CPUs: other work shared the machine, so the timings are noisy")

    print()
    print(f"Command: `{command}`")
    print()
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
