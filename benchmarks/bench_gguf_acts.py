"""GGUF activation modes side by side in one run: the default ``by-kind`` (prompt tokens fp32, generated
tokens int8) against ``int8`` (every row int8 per 32 k, like llama.cpp's Q8 activations), optionally with
llama.cpp and transformers on the same file.

    PYTHONPATH=.:DIR .venv/bin/python benchmarks/bench_gguf_acts.py [--model FILE.gguf] \
        [--cells 1x128x128,16x128x128,1x512x16] [--threads 2] [--peer] [--baseline hf] [--json out.json] \
        [--prompt-int16]

``DIR`` (optional) holds the llama-cpp-python build to compare with (e.g. ``pip install --target DIR``);
``--peer`` adds it. On a CPU with AMX-INT8 the int8 mode's prompt rows run on AMX tiles
(``csrc/gguf_amx.h``), which is where the two modes differ most (prefill). The int8 mode is not exact:
held-out perplexity of SmolLM2-135M Q4_1 17.7629 (by-kind, = the dequantized fp32 model) vs 17.8427
(int8, +0.45%), 40 texts / 7,227 tokens. Every row now carries its system's bits per weight and held-out
perplexity as ``llmopt bench`` measures them (the same token ids for every system; llama.cpp with its own
arithmetic). Prints one line per cell and system; timings on a shared machine are noisy (one run per cell
unless --repeat).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmopt.bench.grid import Cell, GridConfig, run_grid

INT8_ROW = "llmopt[gguf]"  # quant "gguf" = the file's own blocks, run with LLMOPT_GGUF_ACT=int8
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
    ap.add_argument("--peer", action="store_true", help="add llama.cpp (llama-cpp-python importable) on the same file")
    ap.add_argument("--baseline", choices=("none", "hf"), default="none", help="hf: add transformers")
    ap.add_argument("--json", default=None, help="write the whole result here")
    ap.add_argument("--prompt-int16", action="store_true",
                    help="the second llmopt row runs by-kind with int16 prompt rows (LLMOPT_GGUF_PROMPT_INT16=1) "
                         "instead of the int8 mode")
    args = ap.parse_args()
    cfg = GridConfig(model=args.model, cells=parse_cells(args.cells), threads=args.threads, baseline=args.baseline,
                     quants=["gguf"], peers=["llamacpp"] if args.peer else [], repeat=args.repeat,
                     system_env={INT8_ROW: ({"LLMOPT_GGUF_ACT": "by-kind", "LLMOPT_GGUF_PROMPT_INT16": "1"}
                                            if args.prompt_int16 else {"LLMOPT_GGUF_ACT": "int8"}),
                                 "llmopt": {"LLMOPT_GGUF_ACT": "by-kind", "LLMOPT_GGUF_PROMPT_INT16": "0"}})
    res = run_grid(cfg, progress=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    names = {"llmopt": "llmopt by-kind", INT8_ROW: "llmopt i16 prompt" if args.prompt_int16 else "llmopt int8"}
    print(f"{'cell':>14s}  {'system':16s} {'bits/w':>7s} {'held-out ppl':>13s} " + " ".join(f"{k:>27s}" for k in KEYS))
    for row in res["rows"]:
        cell = f"{row['concurrency']}x{row['input_len']}/{row['output_len']}"
        bits, ppl = row.get("bits_per_weight"), row.get("heldout_ppl")
        print(f"{cell:>14s}  {names.get(row['backend'], row['backend']):16s} "
              f"{'-' if bits is None else f'{bits:.3f}':>7s} {'-' if ppl is None else f'{ppl:.4f}':>13s} "
              + " ".join(f"{row[k]:27.1f}" for k in KEYS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
