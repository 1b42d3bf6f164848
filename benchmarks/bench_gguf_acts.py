"""GGUF activation modes side by side in one run, optionally with llama.cpp and transformers on the same file.

    PYTHONPATH=.:DIR .venv/bin/python benchmarks/bench_gguf_acts.py [--model FILE.gguf] \
        [--cells 1x128x128,16x128x128,1x512x16] [--threads 2] [--peer] [--baseline hf] [--json out.json] \
        [--first default|fp32] [--second int8|exact|default] [--repeat N] [--seed S]

Two llmopt rows. The first (``llmopt``, the reference of the greedy-token column unless ``--baseline hf``):
``default`` = the default mode, by-kind (prompt rows int16 where that is faster: VNNI and AVX2 builds; generated
rows int8), or ``fp32`` = the dequantized fp32 model's math for every row (the reference the issue's
"greedy tokens equal to our fp32 engine's" asks for). The second: ``int8`` (every row int8 per 32 k, like
llama.cpp's Q8 activations), ``exact`` (by-kind with exact fp32 prompt rows, ``LLMOPT_GGUF_PROMPT_INT16=0``)
or ``default``.

``DIR`` (optional) holds the llama-cpp-python build to compare with (e.g. ``pip install --target DIR``);
``--peer`` adds it. Every row carries its system's bits per weight and held-out perplexity as ``llmopt
bench`` measures them (the same token ids for every system; llama.cpp with its own arithmetic), and the
number of requests whose greedy tokens equal the first row's. Prints one line per cell and system; timings
on a shared machine are noisy (one run per cell unless --repeat).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmopt.bench.grid import Cell, GridConfig, run_grid

SECOND = "llmopt[gguf]"  # quant "gguf" = the file's own blocks, in the --second mode
# mode -> (row label, environment of its worker)
MODES = {
    "default": ("by-kind", {"LLMOPT_GGUF_ACT": "by-kind", "LLMOPT_GGUF_PROMPT_INT16": "auto"}),
    "exact": ("by-kind fp32 prompt", {"LLMOPT_GGUF_ACT": "by-kind", "LLMOPT_GGUF_PROMPT_INT16": "0"}),
    "int8": ("int8", {"LLMOPT_GGUF_ACT": "int8"}),
    "fp32": ("fp32", {"LLMOPT_GGUF_ACT": "fp32"}),
}
KEYS = ("output_tokens_per_s", "stream_decode_tokens_per_s", "prefill_tokens_per_s", "tpot_p50_ms")


def parse_cells(text: str) -> list[Cell]:
    try:
        return [Cell(*(int(v) for v in part.split("x"))) for part in text.split(",") if part]
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--cells {text!r}: give CONCURRENCYxINPUTxOUTPUT, comma-separated ({e})") from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="registry name or .gguf file")
    ap.add_argument("--cells", default="1x128x128,16x128x128,1x512x16", help="CxINxOUT,... (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random prompts (another seed: other prompts)")
    ap.add_argument("--peer", action="store_true", help="add llama.cpp (llama-cpp-python importable) on the same file")
    ap.add_argument("--baseline", choices=("none", "hf"), default="none", help="hf: add transformers")
    ap.add_argument("--json", default=None, help="write the whole result here")
    ap.add_argument("--first", choices=sorted(MODES), default="default",
                    help="the first llmopt row (reference of the greedy column): default or fp32 (default: %(default)s)")
    ap.add_argument("--second", choices=sorted(MODES), default="int8",
                    help="the second llmopt row: int8, exact (by-kind, fp32 prompt rows) or default (default: %(default)s)")
    ap.add_argument("--second-kv-dtype", default=None,
                    help="the second llmopt row's KV cache type, e.g. float16 (llama.cpp's default; its held-out "
                         "perplexity then scored through the cache); default: float32 like the first row")
    args = ap.parse_args()
    cfg = GridConfig(model=args.model, cells=parse_cells(args.cells), threads=args.threads, baseline=args.baseline,
                     quants=["gguf"], peers=["llamacpp"] if args.peer else [], repeat=args.repeat, seed=args.seed,
                     system_env={"llmopt": MODES[args.first][1], SECOND: MODES[args.second][1]},
                     system_kv_dtype={SECOND: args.second_kv_dtype} if args.second_kv_dtype else {})
    res = run_grid(cfg, progress=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    names = {"llmopt": "llmopt " + MODES[args.first][0],
             SECOND: "llmopt " + MODES[args.second][0] + (f" kv {args.second_kv_dtype}" if args.second_kv_dtype else "")}
    same = {(c["concurrency"], c["input_len"], c["output_len"], n): f"{t['identical']}/{t['requests']}"
            for c in res["cells"] for n, t in c["greedy_tokens_vs_reference"].items()}
    print(f"{'cell':>14s}  {'system':26s} {'bits/w':>7s} {'held-out ppl':>13s} "
          + " ".join(f"{k:>27s}" for k in KEYS) + f" {'same greedy':>12s}")
    for row in res["rows"]:
        key = (row["concurrency"], row["input_len"], row["output_len"])
        cell = "{}x{}/{}".format(*key)
        bits, ppl = row.get("bits_per_weight"), row.get("heldout_ppl")
        print(f"{cell:>14s}  {names.get(row['backend'], row['backend']):26s} "
              f"{'-' if bits is None else f'{bits:.3f}':>7s} {'-' if ppl is None else f'{ppl:.4f}':>13s} "
              + " ".join(f"{row[k]:27.1f}" for k in KEYS) + f" {same.get((*key, row['backend']), 'ref'):>12s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
