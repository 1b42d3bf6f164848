"""GGUF-native vs fp32 vs int4 vs llama.cpp on the same GGUF file, side by side in one run.

    nice -n 10 .venv/bin/python benchmarks/bench_gguf_native.py [--threads 2] [--skip-ppl]

Speed (through ``llmopt bench``'s grid, each system in its own process, one run per cell):
single-stream decode (concurrency 1, 128 in / 128 out) and 16 x 128 / 128 end-to-end output tok/s for

- ``llmopt``: the file's own blocks (the default for a .gguf; Q4_1 projections, Q8_0 tied head),
  decode steps through the fused one-call decode step;
- ``llmopt[gguf]`` (``--op-by-op``): the same blocks, the same kernels, with the fused step off
  (``LLMOPT_FUSED_DECODE=0`` in that worker): the layer-by-layer forward, ~150 op calls per step;
- ``llmopt[fp32]``: dequantized to fp32, packed fp32 GEMM (the default before GGUF-native);
- ``llmopt[int4]``: dequantized and re-rounded to int4 g64 (int8 head), the fused decode step;
- ``llama.cpp`` (llama-cpp-python, if it imports): the same file.

Quality: held-out perplexity (``quant.calib.heldout_texts``, the texts of
benchmarks/bench_quant_quality.py, first ``--max-tokens`` tokens of each) of the GGUF-native model
and of the fp32 model. Prints a table of ratios; timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmopt.bench.grid import Cell, GridConfig, peer_problems, run_grid

MODEL = "smollm2-135m-instruct"
OP_BY_OP = "llmopt[gguf]"  # quant "gguf" = the file's own blocks, like the default row


def _ppl(args: argparse.Namespace) -> None:
    from llmopt.models.linear import PACKED, QuantConfig
    from llmopt.models.loader import load_model
    from llmopt.quant.calib import heldout_texts, score_texts

    texts = heldout_texts()
    res = {}
    n = 0
    kinds: list[tuple[str, dict]] = [("gguf-native", {"gguf_native": True}), ("fp32", {})]
    for label, kw in kinds:
        lm = load_model(args.model, quant_config=QuantConfig(default=PACKED),
                        gguf_act=args.gguf_act if kw else "fp32", **kw)
        t = time.perf_counter()
        nll, n = score_texts(lm.model, lm.tokenizer, texts, args.max_tokens)
        res[label] = math.exp(nll / n)
        print(f"{label:12s} held-out ppl {res[label]:.4f}  ({time.perf_counter() - t:.1f} s)", flush=True)
    print(f"held-out: {len(texts)} texts, {n} scored tokens (first {args.max_tokens} per text); gguf-native / fp32 ppl = "
          f"{res['gguf-native'] / res['fp32']:.5f} ({100 * (res['gguf-native'] / res['fp32'] - 1):+.3f}%)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens per held-out text for the perplexity")
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--gguf-act", choices=["fp32", "int8", "by-kind"], default="fp32",
                    help="activations of the GGUF-native row (KernelSettings.gguf_act, passed to the workers as "
                         "LLMOPT_GGUF_ACT; the fp32 and int4 rows do not read it)")
    ap.add_argument("--op-by-op", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the GGUF-native model with the fused decode step off (row llmopt[gguf])")
    args = ap.parse_args()
    os.environ["LLMOPT_GGUF_ACT"] = args.gguf_act
    os.environ.pop("LLMOPT_FUSED_DECODE", None)  # the default row runs the fused step
    print(f"command: python {' '.join(sys.argv)}")
    if not args.skip_speed:
        peers = [] if peer_problems(["llamacpp"], args.model) else ["llamacpp"]
        cells = [Cell(1, 128, args.output_len), Cell(16, 128, args.output_len)]
        quants = ["fp32", "int4"] + (["gguf"] if args.op_by_op else [])
        config = GridConfig(model=args.model, cells=cells, threads=args.threads, baseline="none",
                            quants=quants, peers=peers, repeat=1,
                            system_env={OP_BY_OP: {"LLMOPT_FUSED_DECODE": "0"}})
        result = run_grid(config, progress=lambda m: print(m, file=sys.stderr, flush=True))
        print(f"load average {result['machine']['load_average_start']} -> {result['machine']['load_average_end']}")
        print("| cell | system | stream decode tok/s | output tok/s | gguf-native x (decode / output) |")
        print("|---|---|---|---|---|")
        for cell in result["cells"]:
            sysm = cell["systems"]
            base = sysm["llmopt"]
            for name, m in sysm.items():
                d = base["stream_decode_tokens_per_s"] / m["stream_decode_tokens_per_s"]
                o = base["output_tokens_per_s"] / m["output_tokens_per_s"]
                label = {"llmopt": f"llmopt (gguf-native, {args.gguf_act} act, fused step)",
                         OP_BY_OP: f"llmopt (gguf-native, {args.gguf_act} act, op by op)"}.get(name, name)
                print(f"| {cell['concurrency']}x{cell['input_len']}/{cell['output_len']} | {label} | "
                      f"{m['stream_decode_tokens_per_s']:.1f} | {m['output_tokens_per_s']:.1f} | {d:.2f} / {o:.2f} |")
            same = cell.get("greedy_tokens_vs_reference", {})
            print(f"|  | greedy tokens equal to gguf-native | {same} | | |")
    if not args.skip_ppl:
        _ppl(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
