"""Does a sequence get the same greedy tokens alone as in a batch? (a check that prints, never asserts)

    .venv/bin/python benchmarks/batch_invariance.py                      # fp32, int8, int4
    LLMOPT_INT4_ACT=fp32 .venv/bin/python benchmarks/batch_invariance.py --quant int4

Runs the same chat prompts through ``LLM.chat`` one at a time and all at once (greedy), per
weight format, and prints how many sequences came out identical and where the first differing
token is. The engine's own tests hold fp32 to this on tiny models (tests/engine/test_engine.py);
this script shows it on the embedded SmolLM2 for the quantized formats too.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from llmopt import LLM, SamplingParams

PROMPTS = ["What is 17 * 23?", "Name three colors.", "Write a haiku about rain.", "Explain gravity briefly.",
           "What is the capital of Japan?", "List prime numbers below 30.", "Tell me a joke.",
           "How do plants grow?", "Why is the sky blue?", "Give me a word that rhymes with cat.",
           "What does a CPU do?", "Count from one to ten in French.", "Describe a cat in one sentence.",
           "What is 2 to the power of 10?", "Name a famous painter.", "What is water made of?"]


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--quant", default="none,int8,int4", help="comma list of formats ('none' = fp32)")
    ap.add_argument("--n", type=int, default=8, help=f"prompts (1-{len(PROMPTS)})")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not 1 <= args.n <= len(PROMPTS):
        ap.error(f"--n must be 1..{len(PROMPTS)}")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    msgs = [[{"role": "user", "content": q}] for q in PROMPTS[: args.n]]
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    print(f"# {args.model}, {args.n} prompts, {args.max_tokens} new tokens, greedy, {args.threads} threads")
    for q in args.quant.split(","):
        llm = LLM(args.model, quant=None if q == "none" else q)
        alone = [llm.chat([m], sp)[0].token_ids for m in msgs]
        together = [o.token_ids for o in llm.chat(msgs, sp)]
        diffs = [first_difference(a, b) for a, b in zip(alone, together)]
        same = sum(d is None for d in diffs)
        where = sorted(d for d in diffs if d is not None)
        print(f"{q or 'none':>6}: {same}/{len(msgs)} identical alone and batched"
              + (f"; first differing token at {where}" if where else ""))
        del llm


if __name__ == "__main__":
    main()
