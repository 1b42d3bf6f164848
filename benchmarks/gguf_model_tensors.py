"""The native GGUF kernels on a real model file's tensors: every 2-D tensor of a type with a native
kernel is packed, decoded (must equal llmopt's / gguf's dequantization bit for bit) and multiplied
(error against a float64 matmul of the dequantized weight, in units of the fp32 summation bound
K * 2^-23 * |x| @ |W|.T), then timed at M = 1 (decode) and M = 64 against the dequantized fp32
matmul (MKL), all linears of the file summed; the act="int8" mode is timed at M = 1 too.

    python benchmarks/gguf_model_tensors.py [--model smollm2-135m-instruct] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
import torch.nn.functional as F

from llmopt.kernels import gguf_linear as G
from llmopt.models.gguf_file import GGUFFile
from llmopt.models.gguf_quants import dequantize
from llmopt.models.registry import resolve


def best_of(fn, reps: int = 5) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve(args.model)
    f = GGUFFile(path)
    native = set(G.supported_types())
    types = Counter(t.qtype.name for t in f.tensors)
    print(f"{path.name if hasattr(path, 'name') else path}: {len(f.tensors)} tensors, types {dict(types)}")
    print(f"threads {args.threads}, paths {G.available_paths()} (default {G.cpu_path()})")
    g = torch.Generator().manual_seed(0)
    n_checked = 0
    worst = 0.0
    t_ours = {p: {1: 0.0, 64: 0.0} for p in G.available_paths()}
    t_a8 = {p: 0.0 for p in G.available_paths()}
    a8_err: list[float] = []
    t_mkl = {1: 0.0, 64: 0.0}
    per_type = Counter()
    for t in f.tensors:
        if t.qtype.name not in native or len(t.shape) != 2:
            continue
        n, k = t.torch_shape
        packed = G.pack_gguf(t.data, t.qtype, (n, k), name=t.name)
        w = dequantize(t.data, t.qtype, (n, k), t.name)
        for p in G.available_paths():
            assert torch.equal(G.native_dequantize(packed, p), w), f"{t.name}: {p} decode differs"
        assert torch.equal(G.dequantize_packed(packed), w), f"{t.name}: torch decode of the layout differs"
        for m in (1, 64):
            x = torch.randn(m, k, generator=g)
            exact = x.double() @ w.double().t()
            bound = k * 2.0 ** -23 * (x.double().abs() @ w.double().abs().t()) + 1e-30
            ys = [G.gguf_linear(x, packed, path=p) for p in G.available_paths()]
            for y in ys:
                worst = max(worst, ((y.double() - exact).abs() / bound).max().item())
            assert all(torch.equal(ys[0], y) for y in ys), f"{t.name}: paths disagree"
            t_mkl[m] += best_of(lambda x=x, w=w: F.linear(x, w))
            for p in G.available_paths():
                t_ours[p][m] += best_of(lambda x=x, packed=packed, p=p: G.gguf_linear(x, packed, path=p))
            if m == 1 and t.qtype.name in G.supported_types("int8"):
                y8 = G.gguf_linear(x, packed, act="int8")
                a8_err.append(((y8.double() - exact).norm() / exact.norm()).item())
                for p in G.available_paths():
                    t_a8[p] += best_of(lambda x=x, packed=packed, p=p: G.gguf_linear(x, packed, act="int8", path=p))
        per_type[t.qtype.name] += 1
        n_checked += 1
    print(f"checked {n_checked} tensors {dict(per_type)}: decode bit-exact on every path; paths bit-identical; "
          f"worst matmul error {worst:.3f} x the fp32 summation bound (<= 1 expected)")
    for m in (1, 64):
        row = f"M={m:3d}: all linears, dequantized fp32 MKL {t_mkl[m] * 1e3:8.2f} ms"
        for p in t_ours:
            row += f" | native {p} {t_ours[p][m] * 1e3:8.2f} ms ({t_mkl[m] / t_ours[p][m]:.2f}x)"
        print(row)
    if a8_err:
        row = "M=  1, act='int8': "
        row += " | ".join(f"{p} {t_a8[p] * 1e3:8.2f} ms ({t_mkl[1] / t_a8[p]:.2f}x MKL)" for p in t_a8)
        print(row)
        print(f"act='int8' relative error vs the exact product (random x, {len(a8_err)} tensors): "
              f"median {sorted(a8_err)[len(a8_err) // 2]:.2e}, max {max(a8_err):.2e}")


if __name__ == "__main__":
    main()
