"""Quantized linear layers vs fp32 and fbgemm W8A8 (torch quantize_dynamic) on CPU.

    .venv/bin/python benchmarks/bench_qlinear.py                     # default table
    .venv/bin/python benchmarks/bench_qlinear.py --cache hot --m 1   # weights resident in L3
    .venv/bin/python benchmarks/bench_qlinear.py --formats int4:64,w8a8 --shapes 8192x2048

Shapes are ``in x out`` (K x N). ``--cache cold`` (default) rotates over enough copies of every
weight that their total size exceeds max(4x the L3 cache, ``--cold-mib`` = 320 MiB), so each call
streams its weight from DRAM like a real decoder layer does (for M > 64, which is compute-bound,
one copy is used); ``hot`` reuses one weight (it sits in L3 when it fits).

``int4`` is run twice: ``fp32-act`` (exact weight-only kernel) and ``int8-act`` (the w4a8 integer
kernel reading the int4 layout: what ``LLM(quant="int4")`` uses at decode, see kernels/qlinear.py).
The last lines summarize int4 / w4a8 GEMV (M=1) against fbgemm's W8A8 side by side.
Reported: median time per call (min in brackets), effective weight bandwidth (bytes of the
weight representation incl. scales / median time), and speed relative to fbgemm W8A8
(>1 = faster than fbgemm). Prints numbers only; never asserts on time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmopt.formats import layouts as F
from llmopt.kernels import qlinear as Q


def l3_bytes() -> int:
    try:
        for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
            if (idx / "level").read_text().strip() == "3":
                s = (idx / "size").read_text().strip()
                mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1], 1)
                return int(s.rstrip("KM")) * mult
    except OSError:
        pass
    return 32 << 20


def cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def time_calls(fns, args_list, rounds: int, min_time: float, clock=time.perf_counter):
    """Round-robin over (fn, args) copies; returns per-call times (one per round)."""
    for f, a in zip(fns, args_list):  # warm-up (and first-touch)
        f(*a)
    per_call = []
    for _ in range(rounds):
        n = 0
        t0 = clock()
        while True:
            for f, a in zip(fns, args_list):
                f(*a)
                n += 1
            dt = clock() - t0
            if dt >= min_time:
                break
        per_call.append(dt / n)
    return per_call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="8192x2048,2048x8192", help="comma list of KxN (in x out)")
    ap.add_argument("--m", default="1,16,64,512", help="comma list of activation rows")
    ap.add_argument("--formats", default="int8:64,int4:64,w8a8,w4a8:64,int4:32,int4:128,w4a8:128,int3:64,int2:64,"
                                         "fp8,fp4",
                    help="comma list of fmt[:group_size]")
    ap.add_argument("--cache", choices=("cold", "hot"), default="cold")
    ap.add_argument("--cold-mib", type=int, default=320, help="cold cache: min MiB of distinct weight copies")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.05, help="seconds per timing round")
    ap.add_argument("--no-fp32", action="store_true")
    ap.add_argument("--w4-prefetch", default=None,
                    help="comma list of software prefetch distances (bytes, 0 = off) for int4 with int8 "
                         "activations and w4a8, each its own line (A/B in one run); default: the built-in 2048")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu = CPU time of the calling thread (only with --threads 1): immune to the "
                         "time slicing of a machine shared with other jobs, not to their cache/DRAM use")
    args = ap.parse_args()

    warnings.filterwarnings("ignore")
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu needs --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.m.split(",")]
    fmts = []
    for f in args.formats.split(","):
        name, _, gs = f.partition(":")
        fmts.append((name, int(gs) if gs else None))

    mod = Q.native_module()
    flags = cpu_flags()
    isa = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16") if f in flags]
    target = max(4 * l3_bytes(), args.cold_mib << 20) if args.cache == "cold" else 0
    print(f"# torch {torch.__version__}, threads={torch.get_num_threads()}, native={'yes' if mod else 'NO (reference)'}, "
          f"cache={args.cache} (rotating >= {target >> 20} MiB of weights per method), clock={args.clock}, "
          f"cpu flags: {' '.join(isa)}")
    print(f"# load average at start: {os.getloadavg()[0]:.2f}")
    if "avx512_vnni" in flags:
        print("# NOTE: this CPU exposes AVX-512 VNNI; fbgemm uses it at run time, llmopt kernels are AVX2-only.")

    pf_list = [int(v) for v in args.w4_prefetch.split(",")] if args.w4_prefetch else []
    if pf_list and not (mod and hasattr(mod, "_set_w4_prefetch")):
        ap.error("--w4-prefetch needs the native kernels")

    def call(q, act, prefetch):
        """``x -> Q.linear(x, q, act=act)``, with the int4 prefetch distance set first when given."""
        if prefetch is None:
            return lambda x: Q.linear(x, q, act=act)

        def run(x):
            mod._set_w4_prefetch(prefetch)
            return Q.linear(x, q, act=act)

        return run

    def copies_for(nbytes: int) -> int:
        return max(1, min(512, -(-target // max(nbytes, 1)))) if target else 1

    hdr = f"{'K x N':>11} {'M':>4}  {'method':<20} {'bpw':>5} {'median ms':>10} {'(min)':>9} {'GB/s':>7} {'vs fbgemm':>9}"
    print(hdr)
    print("-" * len(hdr))
    summary = []
    for k, n in shapes:
        w = torch.randn(n, k) * 0.02
        methods = []  # (name, bpw, nbytes, fns, args)
        if not args.no_fp32:
            lins = []
            for _ in range(copies_for(4 * n * k)):
                lin = torch.nn.Linear(k, n, bias=False)
                lin.weight.data.copy_(w)
                lins.append(lin)
            methods.append(("fp32 torch", 32.0, 4 * n * k, lins))
        lin = torch.nn.Linear(k, n, bias=False)
        lin.weight.data.copy_(w)
        fb = [torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
              for _ in range(copies_for(n * k))]
        fb_bytes = n * k + 8 * n
        methods.append(("fbgemm w8a8", 8.0 * fb_bytes / (n * k), fb_bytes, fb))
        for name, gs in fmts:
            qw = F.quantize(w, name, gs)
            reps = [qw] + [F.QuantizedWeight(qw.fmt, qw.shape, qw.group_size,
                                             {kk: v.clone() for kk, v in qw.tensors.items()})
                           for _ in range(copies_for(qw.nbytes) - 1)]
            label = f"{name}" + (f" g{qw.group_size}" if name in ("int4", "int3", "int2", "int8", "w4a8")
                                 and qw.group_size != k else "")
            if not (mod and Q.supports_native(qw)):
                label += " (ref)"
            acts = [None]
            if name == "int4":
                acts = ["fp32"] + (["int8"] if Q.a8_capable(qw) else [])
            for act in acts:
                integer = name == "w4a8" or act == "int8"
                for pf in (pf_list if integer and pf_list else [None]):
                    methods.append((label + (f" {act}-act" if act else "") + (f" pf{pf}" if pf is not None else ""),
                                    qw.bits_per_weight, qw.nbytes, [call(q, act, pf) for q in reps]))
        for m in ms:
            x = torch.randn(m, k)
            fb_t = None
            with torch.no_grad():
                for label, bpw, nbytes, fns in methods:
                    if label.endswith("(ref)") and m > 64:
                        continue
                    rounds = args.rounds if m <= 64 else max(3, args.rounds // 2)
                    use = fns if m <= 64 else fns[:1]  # M > 64 is compute-bound: one weight copy
                    ts = time_calls(use, [(x,)] * len(use), rounds, args.min_time, clock)
                    med, mn = statistics.median(ts), min(ts)
                    if label == "fbgemm w8a8":
                        fb_t = med
                    ratio = f"{fb_t / med:8.2f}x" if fb_t else f"{'':>9}"
                    if fb_t and m == 1 and (label.startswith("int4 g64") or label.startswith("w4a8 g64")):
                        summary.append(f"{k}x{n} (N={n}, K={k}) M=1  {label:<20} {med * 1e3:7.3f} ms  vs fbgemm "
                                       f"w8a8 {fb_t * 1e3:7.3f} ms  ->  {fb_t / med:.2f}x")
                    print(f"{k:>5} x{n:>5} {m:>4}  {label:<20} {bpw:5.2f} {med * 1e3:10.3f} {mn * 1e3:9.3f} "
                          f"{nbytes / med / 1e9:7.1f} {ratio}", flush=True)
            print()
        del methods
    if summary:
        print(f"# GEMV summary (threads={torch.get_num_threads()}, cache={args.cache}, "
              f"load average now {os.getloadavg()[0]:.2f}):")
        for line in summary:
            print("  " + line)


if __name__ == "__main__":
    main()
