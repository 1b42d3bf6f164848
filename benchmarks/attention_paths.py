"""Paged attention's schedule and instruction-set switches side by side in one process, same bits.

    .venv/bin/python benchmarks/attention_paths.py [--threads 2] [--context 2048] [--rows 4] [--reps 8]

Two measurements, each alternating its settings round by round (timings on a shared machine drift;
only the ratios within one run mean anything):

* ``prefill``: one prompt of ``--context`` tokens as one paged attention call (rows grouped 16 per
  K/V walk, as the model runs it), SmolLM2-135M's shapes (9 query heads on 3 kv heads, head size 64),
  with the inner loops on AVX-512 and on AVX2 (``attn_avx512(1 / 0)``; AVX-512 only where the CPU has it);
* ``decode``: ``--rows`` decode rows of ``--context`` tokens each over 30 per-layer caches (so the
  caches do not stay in the CPU's cache between layers, as in a model), walked one row with all its
  kv heads per item and one (row, kv head) per item (``attn_walk_rows(1 / 0)``).

Each result is checked to be bit-identical between the two settings. Prints ms per call / per pass.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmopt.kernels import ops


def _time(fn, reps: int, settings: dict[str, object]) -> dict[str, float]:
    out: dict[str, list[float]] = {k: [] for k in settings}
    results: dict[str, torch.Tensor] = {}
    for r in range(reps):
        order = list(settings) if r % 2 == 0 else list(reversed(settings))
        for name in order:
            settings[name]()  # type: ignore[operator]
            t = time.perf_counter()
            results[name] = fn()
            out[name].append(time.perf_counter() - t)
    first = next(iter(results.values()))
    for name, res in results.items():
        if not torch.equal(res, first):
            raise SystemExit(f"{name}: result differs from {next(iter(results))} (the settings must not change bits)")
    return {k: statistics.median(v) * 1e3 for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=4, help="decode rows (default %(default)s)")
    ap.add_argument("--reps", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ext = ops._native()
    if ext is None:
        raise SystemExit("the native attention kernel is not available (LLMOPT_NATIVE=0 or no AVX2)")
    before = (ext.attn_avx512(-1), ext.attn_walk_rows(-1))
    g = torch.Generator().manual_seed(0)
    L, Hq, Hk, D, BS, layers = args.context, 9, 3, 64, 16, 30
    try:
        # prefill: rows with contexts 1..L over one sequence's blocks
        nb = (L + BS - 1) // BS
        k = torch.randn(nb, BS, Hk, D, generator=g)
        v = torch.randn(nb, BS, Hk, D, generator=g)
        bt = torch.randperm(nb, generator=g).to(torch.int32)[None].expand(L, -1).contiguous()
        cl = torch.arange(1, L + 1, dtype=torch.int32)
        q = torch.randn(L, Hq, D, generator=g)
        avx512 = ext.attn_avx512(1)
        settings = {"AVX-512": lambda: ext.attn_avx512(1), "AVX2": lambda: ext.attn_avx512(0)}
        if not avx512:
            settings.pop("AVX-512")
        res = _time(lambda: ext.paged_decode_attention(q, k, v, bt, cl, D ** -0.5), args.reps, settings)
        print(f"prefill, one {L}-token prompt, {args.threads} threads: "
              + ", ".join(f"{n} {t:.1f} ms" for n, t in res.items())
              + (f" ({res['AVX2'] / res['AVX-512']:.2f}x)" if avx512 else " (no AVX-512 here)"))
        ext.attn_avx512(int(before[0]))
        # decode: B rows over 30 layers' caches
        B = args.rows
        nb = B * ((L + BS - 1) // BS)
        caches = [(torch.randn(nb, BS, Hk, D, generator=g), torch.randn(nb, BS, Hk, D, generator=g))
                  for _ in range(layers)]
        bt = torch.randperm(nb, generator=g).to(torch.int32).view(B, -1).contiguous()
        cl = torch.full((B,), L, dtype=torch.int32)
        q = torch.randn(B, Hq, D, generator=g)

        def one_pass() -> torch.Tensor:
            return torch.stack([ext.paged_decode_attention(q, kc, vc, bt, cl, D ** -0.5) for kc, vc in caches])

        res = _time(one_pass, args.reps, {"rows whole": lambda: ext.attn_walk_rows(1),
                                          "(row, kv head) items": lambda: ext.attn_walk_rows(0)})
        gb = layers * 2 * caches[0][0].numel() * 4 / 1e9
        print(f"decode, {B} rows x {L} tokens x {layers} layers, {args.threads} threads: "
              + ", ".join(f"{n} {t:.1f} ms ({gb / t * 1e3:.1f} GB/s)" for n, t in res.items())
              + f" ({res['(row, kv head) items'] / res['rows whole']:.2f}x)")
    finally:
        ext.attn_avx512(int(before[0]))
        ext.attn_walk_rows(int(before[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
