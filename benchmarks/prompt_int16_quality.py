"""What int16 prompt rows cost in quality: held-out perplexity at full precision and greedy agreement,
by-kind with exact fp32 prompt rows (``LLMOPT_GGUF_PROMPT_INT16=0``) vs int16 prompt rows (``=1``; the
default where the kernel build has VNNI), two engines in one process on the same GGUF file and the same
token ids.

    .venv/bin/python benchmarks/prompt_int16_quality.py --model SmolLM2-135M-Instruct.Q4_K_M.gguf
"""

from __future__ import annotations

import argparse
import math
import random

import torch

from llmopt.config import EngineConfig, KernelSettings
from llmopt.engine.engine import LLMEngine
from llmopt.engine.sampling_params import SamplingParams
from llmopt.quant import calib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a .gguf file or registry name")
    ap.add_argument("--prompts", type=int, default=32, help="random-token prompts for the greedy comparison")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    engines = {name: LLMEngine(args.model, EngineConfig(num_threads=args.threads,
                                                        kernels=KernelSettings(gguf_prompt_int16=flag)))
               for name, flag in (("fp32 prompt rows", False), ("int16 prompt rows", True))}
    first = next(iter(engines.values()))
    ids = calib.heldout_token_ids(first.tokenizer)
    for name, engine in engines.items():
        with torch.no_grad():
            nll, n = calib.score_token_ids(engine.model, ids)
        print(f"{name}: held-out ppl {math.exp(nll / n):.6f} over {n} tokens")
    rng = random.Random(args.seed)
    vocab = first.tokenizer.vocab_size
    prompts = [[rng.randrange(vocab // 50, vocab // 2) for _ in range(rng.randrange(16, 300))]
               for _ in range(args.prompts)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    a, b = ([o.token_ids for o in e.generate(prompts, params)] for e in engines.values())
    diffs = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), None) for p, q in zip(a, b)]
    same = sum(d is None for d in diffs)
    print(f"greedy outputs identical: {same}/{len(prompts)}; first differing position of the others: "
          f"{sorted(d for d in diffs if d is not None)}")


if __name__ == "__main__":
    main()
