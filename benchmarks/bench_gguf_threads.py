"""When should a native GGUF call split over the threads? Per-call time of `gguf_linear` at small row
counts for a few work thresholds (the extension's `_set_min_parallel_work`: M*N*K below it runs on the
calling thread; int8 calls count a quarter of their M*N*K, int16 a half), side by side in one run.

    python benchmarks/bench_gguf_threads.py [--threads 2] [--type Q5_0] [--ms 1,2,4,8,12]
        [--thresholds 22,20,18] [--acts int8,int16,fp32] [--layers 30]

Each shape gets --layers distinct weight matrices, called in turn, so that the weights stream from
memory as a model's layers do (one matrix called again and again stays in the cache and favours the
calling thread alone). A cell is the minimum over 3 interleaved rounds of the median of 5 passes, in
microseconds per call. Shapes (N x K): SmolLM2-135M's MLP gate+up 3072 x 576, down 576 x 1536, q+k+v
960 x 576, o 576 x 576. These are the calls of op-by-op steps (a step that mixes prompt rows with
decode rows); the fused decode step splits its own work.
"""

from __future__ import annotations

import argparse
import time

import gguf
import numpy as np
import torch
from gguf import quants

from llmopt.kernels import gguf_linear as G

SHAPES = [(3072, 576), (576, 1536), (960, 576), (576, 576)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--type", default="Q5_0", help="a legacy GGUF type gguf.quants can write (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)")
    ap.add_argument("--ms", default="1,2,4,8,12", help="row counts M")
    ap.add_argument("--thresholds", default="22,20,18", help="log2 of the work thresholds to compare")
    ap.add_argument("--acts", default="int8,int16,fp32", help="activation modes (int16 needs no VNNI to run)")
    ap.add_argument("--layers", type=int, default=30, help="distinct weight matrices per shape")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = G.cpu_path()
    mod = G.native_module(path) if path != "reference" else None
    if mod is None:
        raise SystemExit("no native GGUF path on this CPU / build: nothing to compare")
    qt = gguf.GGMLQuantizationType[args.type]
    ms = [int(v) for v in args.ms.split(",")]
    thrs = [1 << int(v) for v in args.thresholds.split(",")]
    acts = args.acts.split(",")
    rng = np.random.default_rng(0)
    default = mod._set_min_parallel_work(thrs[0])
    print(f"path {path}, {args.threads} threads, {args.type}; cells: us per call at thresholds "
          + " / ".join(f"2^{v}" for v in args.thresholds.split(",")) + f" (built-in default 2^{default.bit_length() - 1})")
    try:
        for n, k in SHAPES:
            raw = quants.quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), qt)
            ws = [G.pack_gguf(raw.copy(), qt, (n, k)) for _ in range(args.layers)]
            for act in acts:
                cells = []
                for m in ms:
                    x = torch.randn(m, k)
                    best = {t: float("inf") for t in thrs}
                    for _ in range(3):
                        for t in thrs:
                            mod._set_min_parallel_work(t)
                            for w in ws:
                                G.gguf_linear(x, w, act=act)
                            passes = []
                            for _ in range(5):
                                t0 = time.perf_counter()
                                for w in ws:
                                    G.gguf_linear(x, w, act=act)
                                passes.append((time.perf_counter() - t0) / len(ws))
                            best[t] = min(best[t], float(np.median(passes)) * 1e6)
                    cells.append(f"M={m}: " + "/".join(f"{best[t]:.0f}" for t in thrs))
                print(f"{n:5d} x {k:<5d} {act:5s} " + " | ".join(cells), flush=True)
    finally:
        mod._set_min_parallel_work(default)


if __name__ == "__main__":
    main()
