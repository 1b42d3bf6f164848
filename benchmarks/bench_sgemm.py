"""fp32 small-M linear: torch ``F.linear`` (MKL/oneDNN sgemm on the [N, K] weight) vs the packed
``llmopt_sgemm`` kernel (weights pre-packed into 16-row panels, see csrc/sgemm.cpp).

Weights come from DRAM as in a real forward: every measurement cycles through enough distinct
weight copies (``--pool-mb``, default 320 MB > the 32 MB L3) that no copy is still cached when it is
used again. Both paths are timed side by side in alternating rounds; the median round is reported.

    .venv/bin/python benchmarks/bench_sgemm.py                 # kernel table + end-to-end decode
    .venv/bin/python benchmarks/bench_sgemm.py --no-e2e --ms 1,2,4,8,16,32,64,128
    .venv/bin/python benchmarks/bench_sgemm.py --variants pf0,pf512,pf1024,pf2048n --ms 1,16  # tuning
    .venv/bin/python benchmarks/bench_sgemm.py --variants static,steal4 --no-e2e                # schedule

GB/s counts the fp32 weight bytes once per call (N*K*4); GFLOPS = 2*M*N*K / time. On a shared
machine, ``--threads 1 --cpu-time`` gives kernel numbers that other processes barely disturb.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [  # (name, N, K) of SmolLM2-135M
    ("qkv_proj", 960, 576),
    ("o_proj", 576, 576),
    ("gate_up", 3072, 576),
    ("down", 576, 1536),
    ("lm_head", 49152, 576),
]


CLOCK = time.perf_counter


def _time_pool(fn, pool, x) -> float:
    t0 = CLOCK()
    for w in pool:
        fn(x, w)
    return (CLOCK() - t0) / len(pool)


def bench_kernels(ms, rounds: int, pool_mb: float, variants: list[dict] | None) -> None:
    from llmopt.kernels import dense

    mod = dense.native_module()
    if mod is None:
        raise SystemExit("llmopt_sgemm did not build (or LLMOPT_NATIVE=0); nothing to compare")
    variants = variants or [None]
    default = {"pf": (1024, 0), "sched": (1, 4)}

    def apply(v):
        if v is None:
            return
        pf, sched = dict(default, **v)["pf"], dict(default, **v)["sched"]
        mod._set_prefetch(*pf)
        mod._set_schedule(*sched)

    head = f"{'layer':9} {'N':>6} {'K':>5} {'M':>4} | {'torch us':>9} {'GB/s':>6} {'GFLOP/s':>8} |"
    for v in variants:
        tag = "packed" if v is None else v["tag"]
        head += f" {tag + ' us':>11} {'GB/s':>6} {'GFLOP/s':>8} {'x':>5} |"
    print(head)
    print("-" * len(head))
    for name, n, k in SHAPES:
        copies = max(2, int(pool_mb * 2**20 / (n * k * 4)) + 1)
        g = torch.Generator().manual_seed(0)
        ws = [torch.randn(n, k, generator=g) * 0.02 for _ in range(copies)]
        ps = [mod.pack(w) for w in ws]
        for m in ms:
            x = torch.randn(m, k, generator=g)
            fns = [lambda x, w: F.linear(x, w)]
            pools = [ws]
            for v in variants:
                def run(x, p, v=v, n=n):
                    return mod.gemm(x, p, n, None)
                fns.append(run)
                pools.append(ps)
            times = [[] for _ in fns]
            for i, (fn, pool) in enumerate(zip(fns, pools)):  # warm-up (page faults, OpenMP pool)
                if i:
                    apply(variants[i - 1])
                _time_pool(fn, pool[:2], x)
            for _ in range(rounds):
                for i, (fn, pool) in enumerate(zip(fns, pools)):
                    if i:
                        apply(variants[i - 1])
                    times[i].append(_time_pool(fn, pool, x))
            med = [statistics.median(t) for t in times]
            byts, flops = n * k * 4, 2 * m * n * k
            t0 = med[0]
            line = f"{name:9} {n:6} {k:5} {m:4} | {t0 * 1e6:9.1f} {byts / t0 / 1e9:6.1f} {flops / t0 / 1e9:8.1f} |"
            for t in med[1:]:
                line += f" {t * 1e6:11.1f} {byts / t / 1e9:6.1f} {flops / t / 1e9:8.1f} {med[0] / t:5.2f} |"
            print(line, flush=True)
        del ws, ps
    apply({"tag": "default"})


def bench_e2e(tokens: int, threads: int, model: str, repeats: int = 3) -> None:
    """Decode speed with the model as loaded vs after ``pack_linears``, alternating the two module
    sets between generations (so load changes on a shared machine hit both alike)."""
    from torch import nn

    from llmopt import LLM, SamplingParams
    from llmopt.kernels.dense import pack_linears

    llm = LLM(model, num_threads=threads)
    net = llm.engine.model
    sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    prompt = "Write a short story about a robot learning to paint."

    def swap_in(mods: dict) -> None:
        for name, mod in mods.items():
            parent_name, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent_name) if parent_name else net, child, mod)

    original = {n: m for n, m in net.named_modules() if type(m) is nn.Linear}
    t0 = time.perf_counter()
    swapped = pack_linears(net)
    tpack = time.perf_counter() - t0
    packed = {n: net.get_submodule(n) for n in original}
    res = {"as loaded": ([], [], None), "pack_linears": ([], [], None)}
    for _tag, mods in (("as loaded", original), ("pack_linears", packed)):  # warm-up
        swap_in(mods)
        llm.generate([prompt], sp)
    for _ in range(repeats):
        for tag, mods in (("as loaded", original), ("pack_linears", packed)):
            swap_in(mods)
            t0 = time.perf_counter()
            out = llm.generate([prompt], sp)[0]
            total, decode, _ = res[tag]
            total.append(tokens / (time.perf_counter() - t0))
            if out.tpot:
                decode.append(1.0 / out.tpot)
            res[tag] = (total, decode, list(out.token_ids))
    swap_in(packed)
    print(f"\nend-to-end {model}, {threads} threads, greedy decode of {tokens} tokens, median of {repeats} "
          f"alternating runs ('overall' includes prefill):")
    med = {}
    for tag, (total, decode, _) in res.items():
        med[tag] = statistics.median(decode)
        print(f"  {tag:12}: {statistics.median(total):7.1f} tok/s overall, {med[tag]:7.1f} tok/s decode")
    print(f"  decode speed-up x{med['pack_linears'] / med['as loaded']:.2f}; {swapped} linears packed in "
          f"{tpack:.2f} s; same tokens: {res['as loaded'][2] == res['pack_linears'][2]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="1,4,16,64", help="comma-separated activation row counts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pool-mb", type=float, default=320.0, help="distinct weight bytes cycled per measurement")
    ap.add_argument("--variants", default=None,
                    help="compare kernel settings, comma list of: pfBYTES[n] (software prefetch distance, "
                         "n = NTA hint), static, stealCHUNK")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time kernels by the calling thread's CPU time (only with --threads 1): robust to other "
                         "processes on a shared machine")
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=3, help="end-to-end generations per setting")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.cpu_time:
        if a.threads != 1:
            raise SystemExit("--cpu-time measures the calling thread only: use it with --threads 1")
        global CLOCK
        CLOCK = time.thread_time
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    pf = None
    if a.variants:
        pf = []
        for s in a.variants.split(","):
            if s.startswith("pf"):
                b = s[2:]
                pf.append({"tag": s, "pf": (int(b.rstrip("n")), 1 if b.endswith("n") else 0)})
            elif s == "static":
                pf.append({"tag": s, "sched": (0, 4)})
            elif s.startswith("steal"):
                pf.append({"tag": s, "sched": (1, int(s[5:] or 4))})
            else:
                raise SystemExit(f"unknown variant {s!r} (pfBYTES[n], static, stealCHUNK)")
    if not a.no_kernels:
        bench_kernels([int(s) for s in a.ms.split(",")], a.rounds, a.pool_mb, pf)
    if not a.no_e2e:
        bench_e2e(a.tokens, a.threads, a.model, a.repeats)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
