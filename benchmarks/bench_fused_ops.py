"""Fused native kernels vs the unfused plain-torch sequences they replace (CPU, float32).

    .venv/bin/python benchmarks/bench_fused_ops.py [--threads 2] [--reps 7] [--quick] [--clock wall|cpu] [--stat median|min]

For every op and shape: median time per call of the native kernel (``llmopt.kernels.ops``) and of
the ``*_ref`` op sequence (what the fallback runs), the ratio ref / native (> 1 means the fusion
wins), plus, where torch has a single fused op for the same math, that op as a second baseline
(``F.rms_norm``; ``F.scaled_dot_product_attention`` on an already-gathered contiguous K/V, which
leaves out the paging gather, so it is a lower bound for any torch route). Only prints; never
asserts on time.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmopt.kernels import ops

CLOCK = time.perf_counter
STAT: Callable[[list[float]], float] = statistics.median


def timeit(fn: Callable[[], object], reps: int, target_s: float = 0.02) -> float:
    """Median (or --stat min) seconds per call over ``reps`` repetitions of a loop sized to ~target_s."""
    for _ in range(3):
        fn()
    t0 = CLOCK()
    fn()
    one = max(CLOCK() - t0, 1e-6)
    n = max(1, min(10_000, int(target_s / one)))
    times = []
    for _ in range(reps):
        t0 = CLOCK()
        for _ in range(n):
            fn()
        times.append((CLOCK() - t0) / n)
    return STAT(times)


def cos_sin_cache(max_pos: int, dim: int) -> torch.Tensor:
    inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    f = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    return torch.cat((f.cos(), f.sin()), -1)


def paged(B: int, hq: int, hk: int, d: int, ctx: int, bs: int = 16):
    nb = math.ceil(ctx / bs)
    num_blocks = B * nb + 8
    perm = torch.randperm(num_blocks)[: B * nb].view(B, nb).int()
    kc = torch.randn(num_blocks, bs, hk, d)
    vc = torch.randn(num_blocks, bs, hk, d)
    q = torch.randn(B, hq, d)
    lens = torch.full((B,), ctx, dtype=torch.int32)
    return q, kc, vc, perm.contiguous(), lens


def cases(quick: bool):
    """Yield (op, shape label, native fn, ref fn, optional (label, torch fused fn))."""
    eps = 1e-6
    norm_shapes = [(1, 896), (1, 4096), (16, 2048), (512, 896), (512, 4096)]
    if quick:
        norm_shapes = [(1, 896), (512, 896)]
    for T, H in norm_shapes:
        x, w = torch.randn(T, H), torch.randn(H)
        yield ("rms_norm", f"T={T} H={H}", lambda x=x, w=w: ops.rms_norm(x, w, eps),
               lambda x=x, w=w: ops.rms_norm_ref(x, w, eps),
               ("F.rms_norm", lambda x=x, w=w: F.rms_norm(x, (x.shape[-1],), w, eps)))
    for T, H in norm_shapes:
        x, w = torch.randn(T, H), torch.randn(H)
        r1, r2 = torch.randn(T, H), torch.randn(T, H)
        yield ("add_rms_norm", f"T={T} H={H}", lambda x=x, r=r1, w=w: ops.add_rms_norm(x, r, w, eps),
               lambda x=x, r=r2, w=w: ops.add_rms_norm_ref(x, r, w, eps),
               ("add + F.rms_norm", lambda x=x, r=r2, w=w: F.rms_norm(r.add_(x), (x.shape[-1],), w, eps)))
    mlp_shapes = [(1, 4864), (1, 11008), (16, 8960), (512, 4864)]
    if quick:
        mlp_shapes = [(1, 4864), (512, 4864)]
    for T, inter in mlp_shapes:
        gu = torch.randn(T, 2 * inter)
        yield ("silu_mul", f"T={T} I={inter}", lambda gu=gu: ops.silu_mul(gu), lambda gu=gu: ops.silu_mul_ref(gu), None)
    rope_shapes = [(1, 14, 2, 64), (16, 14, 2, 64), (512, 14, 2, 64), (1, 32, 8, 128), (512, 32, 8, 128)]
    if quick:
        rope_shapes = rope_shapes[:1] + rope_shapes[2:3]
    for T, hq, hk, d in rope_shapes:
        cache = cos_sin_cache(4096, d)
        pos = torch.randint(0, 4096, (T,))
        qkv1, qkv2 = torch.randn(T, (hq + 2 * hk) * d), torch.randn(T, (hq + 2 * hk) * d)
        views = [(a[:, : hq * d].view(T, hq, d), a[:, hq * d : (hq + hk) * d].view(T, hk, d)) for a in (qkv1, qkv2)]
        yield ("rope_", f"T={T} Hq={hq} Hk={hk} D={d}",
               lambda v=views[0], p=pos, c=cache: ops.rope_(*v, p, c),
               lambda v=views[1], p=pos, c=cache: ops.rope_ref_(*v, p, c), None)
    attn_shapes = [(1, 14, 2, 64, 512), (1, 14, 2, 64, 2048), (8, 14, 2, 64, 512), (1, 32, 8, 128, 2048),
                   (16, 32, 8, 128, 1024)]
    if quick:
        attn_shapes = attn_shapes[:1] + attn_shapes[2:3]
    for B, hq, hk, d, ctx in attn_shapes:
        case = paged(B, hq, hk, d, ctx)
        scale = d**-0.5
        q = case[0]
        # torch's best for the same math, K/V already gathered contiguous (no paging cost)
        kg = torch.randn(B, hk, ctx, d)
        vg = torch.randn(B, hk, ctx, d)
        q4 = q.view(B, hq, 1, d)
        yield ("paged_decode_attn", f"B={B} Hq={hq} Hk={hk} D={d} ctx={ctx}",
               lambda c=case, s=scale: ops.paged_decode_attention(*c, s),
               lambda c=case, s=scale: ops.paged_decode_attention_ref(*c, s),
               ("SDPA contiguous KV",
                lambda q4=q4, kg=kg, vg=vg, s=scale: F.scaled_dot_product_attention(q4, kg, vg, scale=s, enable_gqa=True)))
    sw_case = paged(4, 14, 2, 64, 2048)
    yield ("paged_decode_attn", "B=4 Hq=14 Hk=2 D=64 ctx=2048 window=512",
           lambda c=sw_case: ops.paged_decode_attention(*c, 0.125, 512),
           lambda c=sw_case: ops.paged_decode_attention_ref(*c, 0.125, 512), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu = this thread's CPU time (needs --threads 1); steadier on a shared, loaded machine")
    ap.add_argument("--stat", choices=["median", "min"], default="median",
                    help="min = best repetition (filters out other processes' interference)")
    args = ap.parse_args()
    global CLOCK, STAT
    STAT = min if args.stat == "min" else statistics.median
    if args.clock == "cpu":
        if args.threads != 1:
            ap.error("--clock cpu measures one thread: use it with --threads 1")
        CLOCK = time.thread_time

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not ops.native_available():
        print("native extension unavailable (build failed or LLMOPT_NATIVE=0): nothing to compare")
        sys.exit(1)

    rows = []
    with torch.inference_mode():
        for op, shape, native, ref, alt in cases(args.quick):
            t_nat = timeit(native, args.reps)
            t_ref = timeit(ref, args.reps)
            alt_txt = "-"
            if alt is not None:
                t_alt = timeit(alt[1], args.reps)
                alt_txt = f"{t_alt * 1e6:9.1f} ({t_alt / t_nat:4.2f}x) {alt[0]}"
            rows.append((op, shape, t_nat * 1e6, t_ref * 1e6, t_ref / t_nat, alt_txt))

    title = (f"fused native vs unfused torch, float32, torch {torch.__version__}, threads={args.threads}, "
             f"{args.clock} clock, {args.stat} of {args.reps}; speedup = torch / native")
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for col, just in [("op", "left"), ("shape", "left"), ("native µs", "right"), ("unfused torch µs", "right"),
                          ("speedup", "right"), ("torch fused op µs (speedup)", "left")]:
            table.add_column(col, justify=just)
        for op, shape, tn, tr, sp, alt in rows:
            style = "green" if sp > 1.1 else ("red" if sp < 0.95 else "yellow")
            table.add_row(op, shape, f"{tn:.1f}", f"{tr:.1f}", f"[{style}]{sp:.2f}x[/{style}]", alt)
        Console(width=160).print(table)
    except ImportError:
        print(title)
        print(f"{'op':18} {'shape':40} {'native µs':>10} {'torch µs':>10} {'speedup':>8}  torch fused op")
        for op, shape, tn, tr, sp, alt in rows:
            print(f"{op:18} {shape:40} {tn:10.1f} {tr:10.1f} {sp:7.2f}x  {alt}")


if __name__ == "__main__":
    main()
