"""Held-out perplexity of SmolLM2-135M-Instruct: fp32 vs RTN, GPTQ and AWQ (a measurement, not a test).

    .venv/bin/python benchmarks/bench_quant_quality.py [--configs int8:64,int4:64,int4:128,int3:64]
        [--methods rtn,gptq,awq] [--calib-seqs 32] [--seq-len 512] [--max-tokens 512] [--json OUT]

Calibration: ``llmopt.quant.calib.calibration_batches`` (``--calib-seqs`` windows of ``--seq-len``
tokens from the calibration half of ``pydoc_data.topics``); score: ``calib.perplexity`` on the
held-out half (every held-out topic cut to ``--max-tokens`` tokens), so no method is scored on its
calibration text. Each quantized model runs with ``QuantLinear`` (the native kernels).

Note: the registry's SmolLM2 is dequantized from a Q4_1 GGUF, so its "fp32" weights already lie
on a 4-bit grid of group 32; int4 RTN with a different grid (group 64, fp16 min/max of 64 values)
re-rounds them and hurts much more than on a model trained in bf16.

Measured (--max-tokens 256 --calib-seqs 16, 40 held-out texts, 8382 tokens; fp32 ppl 17.339):
int8 g64 RTN -0.11%, AWQ -0.01%, GPTQ +0.30%; int4 g64 RTN +36.4%, GPTQ +19.9% (act_order +12.1%,
clipping search +16.7%), AWQ +11.0%. The int4 target of +3% is missed (see above).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from llmopt.models.loader import load_model
from llmopt.quant import calib
from llmopt.quant.awq import awq_quantize_model
from llmopt.quant.gptq import gptq_quantize_model
from llmopt.quant.linear import quantize_model

MODEL = "smollm2-135m-instruct"


def parse_configs(s: str) -> list[tuple[str, int]]:
    out = []
    for part in s.split(","):
        fmt, _, gs = part.strip().partition(":")
        if not gs:
            raise SystemExit(f"--configs: {part!r} should be FMT:GROUP, e.g. int4:64")
        out.append((fmt, int(gs)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--configs", default="int8:64,int4:64,int4:128,int3:64")
    ap.add_argument("--methods", default="rtn,gptq,awq")
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--n-texts", type=int, default=0, help="first N held-out topics (0 = all)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--base-ppl", type=float, default=None,
                    help="fp32 held-out perplexity from an earlier run with the same text settings (skips it)")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in ("rtn", "gptq", "awq"):
            raise SystemExit(f"--methods: unknown {m!r} (rtn, gptq, awq)")
    configs = parse_configs(args.configs)

    lm = load_model(args.model)
    tok = lm.tokenizer
    texts = calib.heldout_texts()
    if args.n_texts:
        texts = texts[:args.n_texts]
    cal = calib.calibration_batches(tok, n_seqs=args.calib_seqs, seq_len=args.seq_len)
    n_tokens = sum(min(len(tok.encode(t)), args.max_tokens) - 1 for t in texts)
    print(f"model {args.model}: held-out {len(texts)} texts, {n_tokens} scored tokens (max {args.max_tokens}/text); "
          f"calibration {len(cal)} x {args.seq_len} tokens; torch threads {torch.get_num_threads()}", flush=True)

    rows = []

    def record(method, fmt, gs, ppl, q_s, e_s, base, extra=None):
        d = {"method": method, "fmt": fmt, "group_size": gs, "ppl": ppl, "quant_seconds": round(q_s, 1),
             "eval_seconds": round(e_s, 1)}
        if base is not None:
            d["delta_pct"] = 100.0 * (ppl / base - 1.0)
        if extra:
            d.update(extra)
        rows.append(d)
        delta = f"{d['delta_pct']:+7.2f}%" if base is not None else "    ref "
        print(f"{method:5s} {fmt or 'fp32':5s} g{gs or '-':<4} ppl {ppl:8.3f} {delta}  quant {q_s:6.1f} s  "
              f"eval {e_s:5.1f} s  load {os.getloadavg()[0]:.2f}", flush=True)

    if args.base_ppl is None:
        t = time.perf_counter()
        base = calib.perplexity(lm.model, tok, texts, args.max_tokens)
        record("fp32", None, None, base, 0.0, time.perf_counter() - t, None)
    else:
        base = args.base_ppl
        print(f"fp32 ppl {base} (given with --base-ppl)", flush=True)

    for fmt, gs in configs:
        for method in methods:
            m = copy.deepcopy(lm.model)
            t = time.perf_counter()
            extra = {}
            if method == "rtn":
                quantize_model(m, fmt, gs)
            elif method == "gptq":
                st = gptq_quantize_model(m, fmt, gs, cal)
                extra = {"kept_float": st["kept_float"],
                         "mean_rel_err": sum(v["rel_err"] for v in st["layers"].values()) / len(st["layers"]),
                         "mean_rel_err_rtn": sum(v["rel_err_rtn"] for v in st["layers"].values()) / len(st["layers"])}
            else:
                st = awq_quantize_model(m, fmt, gs, cal)
                extra = {"kept_float": st["kept_float"], "unscaled": st["unscaled"],
                         "mean_rel_err": sum(v["rel_err"] for v in st["layers"].values()) / len(st["layers"])}
            q_s = time.perf_counter() - t
            t = time.perf_counter()
            ppl = calib.perplexity(m, tok, texts, args.max_tokens)
            record(method, fmt, gs, ppl, q_s, time.perf_counter() - t, base, extra)
            del m

    print("\n| method | format | group | held-out ppl | vs fp32 | quantize s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        dl = f"{r['delta_pct']:+.2f}%" if "delta_pct" in r else "-"
        print(f"| {r['method']} | {r['fmt'] or 'fp32'} | {r['group_size'] or '-'} | {r['ppl']:.3f} | {dl} | "
              f"{r['quant_seconds']:.0f} |")
    if args.json_out:
        out = {"model": args.model, "heldout_texts": len(texts), "scored_tokens": n_tokens,
               "max_tokens": args.max_tokens, "calib_seqs": len(cal), "seq_len": args.seq_len,
               "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
               "loadavg_end": os.getloadavg(), "results": rows}
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
