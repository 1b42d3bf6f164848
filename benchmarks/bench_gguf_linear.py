"""Native GGUF linear (llmopt.kernels.gguf_linear) vs dequantized fp32 torch matmul (MKL) vs fbgemm
dynamic int8, side by side in one run, per type, per CPU path: fp32 activations, int16 (prompt rows where
int16_fast) and int8 (generated rows), and, on a CPU with AMX-BF16, the act="bf16x3" prompt path (fp32
activations as three bf16 parts on AMX tiles).

    python benchmarks/bench_gguf_linear.py [--threads 2] [--types Q4_0,Q4_K] [--ms 1,16,512]

Shapes are K x N (in_features x out_features): SmolLM2-135M-like 576x1536 (MLP up), 1536x576 (MLP
down), 576x49152 (output layer), and 2048x8192. Weights: random blocks from gguf.quants.quantize
(K-quants: random bytes with valid fp16 scales; skipped where K is not a multiple of 256, as llama.cpp
does). All methods of one shape and M are timed in interleaved rounds (each once per round), and a
cell is the minimum over rounds (the least disturbed run: this is meant for shared machines;
--stat median for the median).
In parentheses: the fp32 MKL time divided by the cell's time (> 1 = faster than MKL on the
dequantized weights). "int8" columns: the act="int8" mode (int8 activations, decode), not exact.
fbgemm int8 quantizes the weights per channel and the activations per tensor (a different, lossier
model): it is the speed reference for an int8 path, not a quality peer.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from gguf import quants

from llmopt.kernels import gguf_linear as G
from llmopt.kernels.tune import FP16_SCALE_OFFSETS

QT = gguf.GGMLQuantizationType
SHAPES = [(576, 1536), (1536, 576), (576, 49152), (2048, 8192)]
DEFAULT_TYPES = "Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q4_K,Q5_K,Q6_K"
K_QUANTS = (QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K)  # gguf.quants cannot quantize these: random blocks


def random_blocks(qt: QT, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n, bytes_per_row] GGUF blocks of type qt for an [n, k] weight."""
    block, ts = gguf.GGML_QUANT_SIZES[qt]
    if qt not in K_QUANTS:
        return quants.quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), qt)
    raw = rng.integers(0, 256, size=(n, k // block, ts), dtype=np.uint8)
    for off in FP16_SCALE_OFFSETS[qt]:
        v = (np.abs(rng.standard_normal((n, k // block))) * 1e-3).astype(np.float16)
        raw[..., off:off + 2] = v.view(np.uint8).reshape(n, k // block, 2)
    return raw.reshape(n, -1)


def time_interleaved(fns: dict[str, Callable[[], object]], budget_s: float, min_rounds: int = 3,
                     stat: str = "min") -> dict[str, float]:
    """Seconds per call of each fn, measured in interleaved rounds (every fn once per round, until
    ``min_rounds`` and ``budget_s`` per fn are reached), so load changes on a shared machine hit all
    of them alike; the minimum (or median) over rounds."""
    for fn in fns.values():
        fn()  # warm-up (first touch, caches)
    times: dict[str, list[float]] = {key: [] for key in fns}
    t_end = time.perf_counter() + budget_s * len(fns)
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() < t_end and rounds < 200):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
        rounds += 1
    pick = min if stat == "min" else statistics.median
    return {key: pick(v) for key, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--ms", default="1,16,512")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--budget", type=float, default=0.3, help="seconds of timing per cell")
    ap.add_argument("--stat", choices=["min", "median"], default="min")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")  # fbgemm's deprecation notice
    rng = np.random.default_rng(0)
    types = [QT[t.strip().upper()] for t in args.types.split(",") if t.strip()]
    ms = [int(m) for m in args.ms.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    paths = G.available_paths()
    print(f"torch {torch.__version__}, threads {args.threads}, default path {G.cpu_path()}, paths {paths}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"times in ms ({args.stat} per cell)")
    fp32_paths = [p for p in paths if p not in ("avx512_vnni", "avx512_amx")]  # (their fp32 kernel is the avx512 one)
    a8_types = set(G.supported_types("int8"))
    bf3 = G.bf16x3_available()
    cols = (["mkl", "fbgemm8"] + [f"fp32 {p}" for p in fp32_paths] + (["bf16x3"] if bf3 else [])
            + [f"int16 {p}" for p in paths] + [f"int8 {p}" for p in paths])
    print("cells: ms (MKL time / this time); int16 = the act='int16' mode (prompt rows where int16_fast); "
          "int8 = the act='int8' mode (generated rows; every row with LLMOPT_GGUF_ACT=int8)")
    for k, n in shapes:
        w32 = torch.randn(n, k) * 0.05
        lin = torch.ao.nn.quantized.dynamic.Linear(k, n, dtype=torch.qint8)
        lin.set_weight_bias(torch.quantize_per_channel(w32, (w32.abs().amax(1) / 127).clamp_min(1e-8),
                                                       torch.zeros(n, dtype=torch.long), 0, torch.qint8), None)
        packs = {qt: G.pack_gguf(random_blocks(qt, n, k, rng), qt, (n, k)) for qt in types
                 if k % gguf.GGML_QUANT_SIZES[qt][0] == 0}
        print(f"\nK x N = {k} x {n}")
        print(f"{'type':6s} {'bpw':>5s} {'M':>4s} " + " ".join(f"{c:>17s}" for c in cols))
        res: dict[int, dict[str, float]] = {}
        for m in ms:
            x = torch.randn(m, k)
            fns: dict[str, Callable[[], object]] = {
                "mkl": lambda x=x, w32=w32: F.linear(x, w32), "fbgemm8": lambda x=x, lin=lin: lin(x)}
            for qt, pk in packs.items():
                for p in fp32_paths:
                    fns[f"{qt.name} fp32 {p}"] = lambda x=x, pk=pk, p=p: G.gguf_linear(x, pk, path=p)
                if qt.name in a8_types and bf3:
                    fns[f"{qt.name} bf16x3"] = lambda x=x, pk=pk: G.gguf_linear(x, pk, act="bf16x3")
                if qt.name in a8_types:
                    for p in paths:
                        fns[f"{qt.name} int16 {p}"] = lambda x=x, pk=pk, p=p: G.gguf_linear(x, pk, act="int16", path=p)
                        fns[f"{qt.name} int8 {p}"] = lambda x=x, pk=pk, p=p: G.gguf_linear(x, pk, act="int8", path=p)
            res[m] = time_interleaved(fns, args.budget, stat=args.stat)
        for qt in types:
            if qt not in packs:
                print(f"{qt.name:6s}  n/a (K not a multiple of its block size)")
                continue
            for m in ms:
                r = res[m]
                cells = [f"{r['mkl'] * 1e3:9.3f}        "]
                keys = ["fbgemm8"] + [f"{qt.name} fp32 {p}" for p in fp32_paths] + ([f"{qt.name} bf16x3"] if bf3 else [])
                for key in keys + [f"{qt.name} int{b} {p}" for b in (16, 8) for p in paths]:
                    cells.append(f"{r[key] * 1e3:9.3f} ({r['mkl'] / r[key]:5.2f})" if key in r else f"{'-':>17s}")
                print(f"{qt.name:6s} {packs[qt].bits_per_weight:5.2f} {m:4d} " + " ".join(cells))

if __name__ == "__main__":
    main()
