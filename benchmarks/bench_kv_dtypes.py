"""KV cache element types side by side in one process: float32 (the default for a float32 model) against
float16 (half the bytes, llama.cpp's default), int8 or fp8.

Two measurements, each interleaved so that the machine's slow and fast phases hit every type alike:

- ``attention``: the native paged decode attention alone over the model's shapes (every layer's call for
  ``--rows`` sequences of ``--context`` tokens, blocks laid out as the engine hands them out: each prompt's
  blocks together, the generated tokens' blocks interleaved across the sequences), median per step.
- ``engine``: one engine per type, stepped in lockstep on the same requests (``--rows`` prompts of
  ``--prompt`` random tokens, ``--new`` greedy tokens, EOS ignored), the order alternating every step; the
  median of the paired per-step ratios of the decode steps, and how many requests gave the same tokens as
  the first type's.

    python benchmarks/bench_kv_dtypes.py --model SmolLM2-135M-Instruct.Q4_K_M.gguf --kv-dtypes float32,float16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def engine_tables(rows: int, context: int, prompt: int, block_size: int, layers: int) -> list[torch.Tensor]:
    """Per layer a [rows, blocks] table: prompt blocks per sequence together, later blocks interleaved."""
    per = (context + block_size - 1) // block_size
    pb = min(per, (prompt + block_size - 1) // block_size)
    out = []
    for li in range(layers):
        base = li * rows * per
        t = torch.zeros(rows, per, dtype=torch.int32)
        for s in range(rows):
            for j in range(per):
                t[s, j] = base + (s * pb + j if j < pb else rows * pb + (j - pb) * rows + s)
        out.append(t)
    return out


def attention(args, cfg) -> None:
    from llmopt.kernels import kv_quant, ops

    B, Hq, Hk, D, BS, L = args.rows, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 16, args.context
    tables = engine_tables(B, L, args.prompt, BS, cfg.num_layers)
    nblocks = B * ((L + BS - 1) // BS) * cfg.num_layers
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(nblocks, BS, Hk, D, generator=g), torch.randn(nblocks, BS, Hk, D, generator=g)
    q = torch.randn(B, Hq, D, generator=g)
    lens = torch.full((B,), L, dtype=torch.int32)
    calls = {}
    for kv in args.kv_dtypes:
        if kv in ("int8", "fp8"):
            codes = torch.int8 if kv == "int8" else kv_quant.FP8
            (k8, ks), (v8, vs) = kv_quant.quantize_kv(kc, codes), kv_quant.quantize_kv(vc, codes)
            calls[kv] = lambda t, k8=k8, v8=v8, ks=ks, vs=vs: kv_quant.paged_decode_attention_int8(
                q, k8, v8, ks, vs, t, lens, 0.125)
        else:
            dt = {"float32": torch.float32, "float16": torch.float16}[kv]
            kk, vv = kc.to(dt), vc.to(dt)
            calls[kv] = lambda t, kk=kk, vv=vv: ops.paged_decode_attention(q, kk, vv, t, lens, 0.125)
    times: dict[str, list[float]] = {kv: [] for kv in calls}
    for _ in range(args.rounds * 3):
        for kv, f in calls.items():
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                for t in tables:
                    f(t)
                ts.append(time.perf_counter() - t0)
            times[kv].append(float(np.median(ts)))
    base = np.median(times[args.kv_dtypes[0]])
    print(f"attention alone: {B} rows x {L} tokens x {cfg.num_layers} layers ({Hq} query / {Hk} kv heads, "
          f"head_dim {D}), ms per step (all layers):")
    for kv, v in times.items():
        print(f"  {kv:8s} {np.median(v) * 1e3:7.2f} ms   {base / np.median(v):.2f}x")


def engine(args) -> None:
    from llmopt.config import EngineConfig
    from llmopt.engine.engine import LLMEngine
    from llmopt.engine.sampling_params import SamplingParams

    engs = [LLMEngine(args.model, EngineConfig(num_threads=args.threads, max_num_seqs=args.rows,
                                               enable_prefix_caching=False, kv_dtype=kv)) for kv in args.kv_dtypes]
    rng = np.random.default_rng(args.seed)
    p = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)
    vocab = engs[0].model_config.vocab_size
    steps: list[list[float]] = [[] for _ in engs]
    same = [0] * len(engs)
    total = 0
    for _ in range(args.rounds):
        prompts = [[int(x) for x in rng.integers(0, vocab, args.prompt)] for _ in range(args.rows)]
        seqs = [[e.add_request(pr, p) for pr in prompts] for e in engs]
        k = 0
        while any(e.has_unfinished() for e in engs):
            order = list(range(len(engs)))
            if k % 2:
                order.reverse()
            for i in order:
                t0 = time.perf_counter()
                engs[i].step()
                if k > 0:  # step 0 is the prefill
                    steps[i].append(time.perf_counter() - t0)
            k += 1
        for i in range(len(engs)):
            same[i] += sum(a.output_ids == b.output_ids for a, b in zip(seqs[0], seqs[i]))
        total += args.rows
    ref = np.array(steps[0])
    print(f"engine, decode steps of {args.rows} sequences ({args.prompt}-token prompts, {args.new} new tokens, "
          f"{args.rounds} rounds): median ms per step, the paired ratio to {args.kv_dtypes[0]}, requests whose "
          f"greedy tokens equal {args.kv_dtypes[0]}'s:")
    for kv, s, n in zip(args.kv_dtypes, steps, same):
        a = np.array(s)
        print(f"  {kv:8s} {np.median(a) * 1e3:7.2f} ms   {np.median(ref / a):.3f}x   {n}/{total}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="registry name, HF directory or .gguf file")
    ap.add_argument("--kv-dtypes", default="float32,float16", help="comma-separated: float32, float16, int8, fp8")
    ap.add_argument("--rows", type=int, default=16, help="sequences decoded together")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence")
    ap.add_argument("--new", type=int, default=128, help="generated tokens per sequence (engine)")
    ap.add_argument("--context", type=int, default=192, help="cached tokens per sequence (attention alone)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("attention", "engine"), default=None)
    args = ap.parse_args()
    args.kv_dtypes = [k.strip() for k in args.kv_dtypes.split(",") if k.strip()]
    bad = [k for k in args.kv_dtypes if k not in ("float32", "float16", "int8", "fp8")]
    if bad or len(args.kv_dtypes) < 2:
        raise SystemExit(f"--kv-dtypes takes two or more of float32, float16, int8, fp8; got {args.kv_dtypes}")
    torch.set_num_threads(args.threads)
    if args.only != "engine":
        from llmopt.models.loader import open_checkpoint
        from llmopt.models.registry import resolve

        cfg, _, weights, _ = open_checkpoint(resolve(args.model))  # the shapes only: no weight is read
        del weights
        attention(args, cfg)
    if args.only != "attention":
        engine(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
