"""The reasoning model in two (or more) weight formats side by side: held-out perplexity, bits per
weight, accuracy on held-out math + logic items (paired: how many items differ) and the time to answer
them as competition-style cases, the formats alternated case by case in one process.

    python benchmarks/reasoning_quant_ab.py --quants fp32,q8_0 --n 200 --seed 9005 --threads 2
"""

from __future__ import annotations

import argparse
import math
import time

from llmopt.batch.runner import answer
from llmopt.config import EngineConfig
from llmopt.engine.engine import LLMEngine
from llmopt.engine.sampling_params import SamplingParams
from llmopt.quant import calib
from llmopt.reasoning.format import extract_answer
from llmopt.tasks.evaluate import EvalConfig, _suite, build_items, linear_bits_per_weight


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-reasoning")
    ap.add_argument("--quants", default="fp32,q8_0", help="formats, comma-separated; the first is the reference")
    ap.add_argument("--n", type=int, default=100, help="items per suite (math and logic)")
    ap.add_argument("--seed", type=int, default=9005, help="item seed (held out: not a training seed)")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--case-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    cfg = EvalConfig(model=args.model, suites=("math", "logic"), n=args.n, seed=args.seed)
    by_suite = build_items(cfg)
    items = [it for s in cfg.suites for it in by_suite[s]]
    graders = {s: _suite(s, cfg) for s in cfg.suites}
    quants = args.quants.split(",")
    engines = {q: LLMEngine(args.model, EngineConfig(num_threads=args.threads, max_num_seqs=args.concurrency), quant=q)
               for q in quants}
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop=["</answer>"], include_stop_str_in_output=True,
                        loop_exit=True, jump_forward=True)
    ppl = {}
    for q, e in engines.items():
        nll, n = calib.score_token_ids(e.model, calib.heldout_token_ids(e.tokenizer))
        ppl[q] = (math.exp(nll / n), n, linear_bits_per_weight(e.model))
        answer(e, [it.messages for it in items], SamplingParams(max_tokens=1, temperature=0.0), args.concurrency)
    secs = dict.fromkeys(quants, 0.0)
    correct: dict[str, list[bool]] = {q: [] for q in quants}
    for c, start in enumerate(range(0, len(items), args.case_size)):
        case = items[start:start + args.case_size]
        for j in range(len(quants)):
            q = quants[(j + c) % len(quants)]
            t0 = time.perf_counter()
            outs = answer(engines[q], [it.messages for it in case], sp, args.concurrency)
            secs[q] += time.perf_counter() - t0
            correct[q] += [graders[it.suite].grade(it, extract_answer(o.text), o.text).correct for it, o in zip(case, outs)]
    ref = quants[0]
    print(f"{args.model}, seed {args.seed}, {len(items)} items, cases of {args.case_size} at concurrency "
          f"{args.concurrency}, threads {engines[ref].config.num_threads}")
    print("quant | bits/w | held-out ppl | accuracy | items differing from ref (net) | time s | time ratio")
    for q in quants:
        p, n, bits = ppl[q]
        diff = sum(a != b for a, b in zip(correct[q], correct[ref]))
        net = sum(correct[q]) - sum(correct[ref])
        print(f"{q} | {bits:.2f} | {p:.4f} ({n} tokens) | {sum(correct[q]) / len(items):.3f} ({sum(correct[q])}) | "
              f"{diff} ({net:+d}) | {secs[q]:.1f} | {secs[q] / secs[ref]:.2f}")


if __name__ == "__main__":
    main()
