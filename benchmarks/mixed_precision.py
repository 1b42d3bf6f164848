"""Mixed precision vs uniform int4 RTN on SmolLM2-135M-Instruct: held-out perplexity at <= 4 bits.

    taskset -c 1 .venv/bin/python benchmarks/mixed_precision.py [--runs uniform,mixed,mixed-gptq]
        [--bits 4] [--ppl-texts 40] [--ppl-tokens 256] [--lm-head float] [--out DIR] [--json OUT]

Every run is one ``llmopt quantize`` (called in-process, ``--threads 1``) writing a checkpoint
under ``--out`` and its ``--json``; the table shows, per run, the average real stored bits per
weight over the quantized decoder linears (codes incl. block padding + scales + mins, as
``llmopt.quant.mixed`` counts them; for the uniform run that is the format's bits), the held-out
perplexity before (fp32) and after, and the wall and CPU time of the whole command (CPU time is
the honest cost on a shared machine: the process may be paused by other jobs). All runs score the
same held-out texts (``calib.heldout_texts()[:ppl_texts]``, each cut to ``ppl_tokens`` tokens);
the mixed plans are chosen on the calibration split only (``--sens-seqs`` windows).

Runs: ``uniform`` = int4 group 64 RTN (the project default); ``mixed`` = ``--bits B`` (RTN, group
size per linear, Fisher estimate + re-measurement); ``mixed-gptq`` = the same plan search, then
GPTQ of every linear at its planned format (``--method gptq``, 32 x 512 calibration tokens);
``uniform-gptq`` = int4 g64 GPTQ; ``mixed-kl`` = ``--bits B -g 64 --sensitivity kl`` (the old
path: measured single-module KL, int2/3/4/8 at group 64; ~30 min).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "smollm2-135m-instruct"


def run_args(name: str, bits: str) -> list[str]:
    if name == "uniform":
        return ["--format", "int4", "-g", "64"]
    if name == "uniform-gptq":
        return ["--format", "int4", "-g", "64", "--method", "gptq"]
    if name == "mixed":
        return ["--bits", bits]
    if name == "mixed-gptq":
        return ["--bits", bits, "--method", "gptq"]
    if name == "mixed-kl":
        return ["--bits", bits, "-g", "64", "--sensitivity", "kl"]
    raise SystemExit(f"unknown run {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--runs", default="uniform,mixed,mixed-gptq")
    ap.add_argument("--bits", default="4")
    ap.add_argument("--ppl-texts", type=int, default=40)
    ap.add_argument("--ppl-tokens", type=int, default=256)
    ap.add_argument("--lm-head", default="float", help="lm_head format for every run (float: only the decoder "
                                                        "linears are quantized)")
    ap.add_argument("--out", default="/tmp/llmopt_mixed_precision")
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--extra", default="", help="extra arguments for every llmopt quantize run")
    args = ap.parse_args()

    import typer

    from llmopt.cli import app

    cmd = typer.main.get_command(app)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in [r.strip() for r in args.runs.split(",") if r.strip()]:
        js = out / f"{name}.json"
        argv = ["quantize", args.model, "-o", str(out / name), "--force", "--threads", "1", "--json", str(js),
                "--ppl-texts", str(args.ppl_texts), "--ppl-tokens", str(args.ppl_tokens), "--lm-head", args.lm_head,
                *run_args(name, args.bits), *args.extra.split()]
        print("llmopt " + " ".join(argv), flush=True)
        t, c = time.perf_counter(), time.process_time()
        try:
            cmd.main(argv, standalone_mode=False)
        except Exception as e:  # report the failed run, go on with the others
            print(f"run {name} failed: {type(e).__name__}: {e}", flush=True)
            continue
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        r = json.loads(js.read_text())
        r["wall_seconds"], r["cpu_seconds"] = wall, cpu
        if "plan_bits_per_weight" in r:
            r["linear_bits"] = r["plan_bits_per_weight"]
        else:  # uniform: every decoder linear in the same format
            from llmopt.quant.mixed import format_bits

            qc = json.loads((out / name / "quant_config.json").read_text())
            mods = {k: v for k, v in qc["modules"].items() if k != "lm_head"}
            n = sum(v["in_features"] * v["out_features"] for v in mods.values())
            r["linear_bits"] = sum(format_bits(v["fmt"], v["in_features"], v["group_size"]) * v["in_features"]
                                   * v["out_features"] for v in mods.values()) / n
        rows.append((name, r))

    from llmopt.models.loader import load_model
    from llmopt.quant import calib

    tok = load_model(args.model).tokenizer
    texts = calib.heldout_texts()[:args.ppl_texts]
    n_tok = sum(min(len(tok.encode(t)), args.ppl_tokens) - 1 for t in texts)
    print(f"\nheld-out: {len(texts)} texts x <= {args.ppl_tokens} tokens ({n_tok} scored tokens); "
          f"lm_head {args.lm_head}; one core")
    print(f"{'run':14s} {'bits/w':>7s} {'ppl fp32':>9s} {'ppl':>9s} {'change':>8s} {'wall s':>8s} {'cpu s':>7s}  plan")
    for name, r in rows:
        ch = 100 * (r["ppl_after"] / r["ppl_before"] - 1)
        plan = ", ".join(f"{k} {v}" for k, v in r.get("plan_counts", {}).items())
        print(f"{name:14s} {r['linear_bits']:7.3f} {r['ppl_before']:9.3f} {r['ppl_after']:9.3f} {ch:+7.1f}% "
              f"{r['wall_seconds']:8.1f} {r['cpu_seconds']:7.1f}  {plan}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"scored_tokens": n_tok, "runs": {n: r for n, r in rows}},
                                                  indent=2) + "\n")


if __name__ == "__main__":
    main()
