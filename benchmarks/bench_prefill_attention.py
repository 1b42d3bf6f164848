"""Prefill rows through the native paged attention: grouped rows (fused.cpp group_rows) vs one row per item.

    .venv/bin/python benchmarks/bench_prefill_attention.py [--lens 512 2048] [--groups 1 2 4 8 16] [--threads 1 2]
                                                            [--reps 9] [--int8]

One sequence's whole prompt of T rows in one call, laid out as transformer._paged does it (row i: the
sequence's block table, context length i + 1), SmolLM2-135M shapes by default (Hq 9, Hk 3, D 64, block
16). For every (T, threads) the group sizes are timed interleaved (one call of each per round, --reps
rounds) and the median per call is printed with its speed-up over group size 1 (the one-row path).
--int8 times the int8-cache kernel (kv_int8.cpp) the same way. Checks that every group size gives the
same bits as group size 1; never asserts on time.

--engine MODEL instead times a whole prefill (LLM.generate of one --lens prompt of random ids, max_tokens
1, prefix caching off) with the attention ops' group_rows set to each --groups value in turn, interleaved,
in one process (e.g. --engine smollm2-135m-instruct --quant gguf --threads 2 --groups 1 16).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmopt.kernels import kv_quant, ops


def prompt_case(T: int, hq: int, hk: int, d: int, bs: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    nb = math.ceil(T / bs)
    num_blocks = nb + 8
    table = torch.randperm(num_blocks, generator=g)[:nb].int()
    kc = torch.randn(num_blocks, bs, hk, d, generator=g)
    vc = torch.randn(num_blocks, bs, hk, d, generator=g)
    q = torch.randn(T, hq, d, generator=g)
    return q, kc, vc, table.expand(T, -1).contiguous(), torch.arange(1, T + 1, dtype=torch.int32)


def caller(ext, int8: bool, T: int, args: argparse.Namespace) -> Callable[[int], torch.Tensor]:
    """call(group_rows): the kernel on a T-row prompt."""
    q, kc, vc, bt, cl = prompt_case(T, args.hq, args.hk, args.head_dim, args.block_size)
    scale = args.head_dim**-0.5
    if int8:
        (kq, ks), (vq, vs) = kv_quant.quantize_kv(kc), kv_quant.quantize_kv(vc)
        return lambda r: ext.paged_decode_attention_int8(q, kq, vq, ks, vs, bt, cl, scale, -1, r)
    return lambda r: ext.paged_decode_attention(q, kc, vc, bt, cl, scale, -1, 0, r)


def engine_prefill(args: argparse.Namespace, groups: list[int]) -> None:
    import functools

    from llmopt import LLM, SamplingParams

    llm = LLM(args.engine, quant=args.quant, num_threads=args.threads[0], enable_prefix_caching=False)
    exts = [e for e in (ops._native(), kv_quant._native()) if e is not None]
    originals = {(id(e), name): getattr(e, name) for e in exts for name in dir(e) if name.startswith("paged_decode_attention")}
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    vocab = llm.tokenizer.vocab_size
    g = torch.Generator().manual_seed(0)

    def run(T: int, r: int) -> float:
        for e in exts:
            for (eid, name), fn in originals.items():
                if eid == id(e):
                    setattr(e, name, functools.partial(fn, group_rows=r))
        ids = torch.randint(100, vocab - 100, (T,), generator=g).tolist()
        t0 = time.perf_counter()
        llm.generate([ids], params)
        return time.perf_counter() - t0

    print(f"engine {args.engine} quant {args.quant} threads {args.threads[0]}: prefill seconds, median of "
          f"{args.reps} interleaved rounds")
    for T in args.lens:
        for r in groups:
            run(T, r)  # warm-up
        times: dict[int, list[float]] = {r: [] for r in groups}
        for _ in range(args.reps):
            for r in groups:
                times[r].append(run(T, r))
        med = {r: statistics.median(v) for r, v in times.items()}
        cells = "  ".join(f"R={r}: {med[r]:7.3f} s ({T / med[r]:6.1f} tok/s, {med[1] / med[r]:4.2f}x)" for r in groups)
        print(f"T={T:5d}  {cells}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--hq", type=int, default=9)
    ap.add_argument("--hk", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--int8", action="store_true", help="time the int8-cache kernel instead of the float one")
    ap.add_argument("--engine", default=None, help="time whole prefills of this model instead of the kernel")
    ap.add_argument("--quant", default=None, help="--engine: LLM quant (e.g. gguf)")
    args = ap.parse_args()
    if args.engine is not None:
        engine_prefill(args, sorted(set(args.groups) | {1}))
        return

    ext = kv_quant._native() if args.int8 else ops._native()
    if ext is None:
        sys.exit("native extension unavailable")
    groups = sorted(set(args.groups) | {1})
    print(f"{'int8' if args.int8 else 'float32'} cache, Hq {args.hq} Hk {args.hk} D {args.head_dim} "
          f"block {args.block_size}; median of {args.reps} interleaved rounds, ms per call")
    for T in args.lens:
        call = caller(ext, args.int8, T, args)
        base = call(1)
        same = {r: torch.equal(call(r), base) for r in groups}
        for nt in args.threads:
            torch.set_num_threads(nt)
            for r in groups:  # warm-up
                call(r)
            times: dict[int, list[float]] = {r: [] for r in groups}
            for _ in range(args.reps):
                for r in groups:
                    t0 = time.perf_counter()
                    call(r)
                    times[r].append(time.perf_counter() - t0)
            med = {r: statistics.median(v) * 1e3 for r, v in times.items()}
            cells = "  ".join(f"R={r}: {med[r]:8.2f} ({med[1] / med[r]:4.2f}x{'' if same[r] else ' BITS DIFFER'})"
                              for r in groups)
            print(f"T={T:5d} threads={nt}  {cells}")


if __name__ == "__main__":
    main()
