"""Time to first token of one short prompt, by prompt length (median of 8 distinct random prompts per
length, default model, 2 threads). Run it twice to compare a setting, e.g. the AMX-BF16 prompt rows on
and off, alternated in separate processes:

    LLMOPT_GGUF_BF16X3=1 .venv/bin/python benchmarks/prompt_ttft.py
    LLMOPT_GGUF_BF16X3=0 .venv/bin/python benchmarks/prompt_ttft.py [--lengths 4,16,64,128]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

from llmopt import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", default="4,16,64,128", help="prompt lengths in tokens (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model)
    rng = random.Random(1)
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    setting = os.environ.get("LLMOPT_GGUF_BF16X3", "1")
    for n in (int(v) for v in args.lengths.split(",")):
        ts = []
        for _ in range(args.reps):
            p = [rng.randrange(100, 40000) for _ in range(n)]
            t = time.perf_counter()
            llm.generate([p], sp)
            ts.append(time.perf_counter() - t)
        print(f"LLMOPT_GGUF_BF16X3={setting} prompt {n:5d} tokens: TTFT {statistics.median(ts) * 1e3:7.1f} ms", flush=True)


if __name__ == "__main__":
    main()
