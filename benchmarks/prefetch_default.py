"""The GGUF kernels' prefetch setting A/B on a whole model's decode steps, in one process, alternated:
every type's one-row distance set to each value in turn (the tuned table, if any, is overwritten), the
median decode-step time of a 128-token greedy generation per round. Results never depend on the
setting, only speed (tests/kernels/test_prefetch_tune.py).

    [LLMOPT_CPU_PATH=avx2] .venv/bin/python benchmarks/prefetch_default.py [--model FILE.gguf] \\
        [--values 1024,-1] [--rounds 4] [--threads 2]

-1 = the next group of panels (``tune.GROUP``, the compiled-in default since the sixteenth session).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gguf

from llmopt import SamplingParams
from llmopt.config import EngineConfig
from llmopt.engine.engine import LLMEngine
from llmopt.kernels import gguf_linear as G


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--values", default="1024,-1", help="prefetch settings to alternate (bytes; -1 = next group)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    values = [int(v) for v in args.values.split(",")]
    eng = LLMEngine(args.model, EngineConfig(num_threads=args.threads))
    mod = G.native_module(G.cpu_path())
    if mod is None:
        raise SystemExit("no native GGUF kernels here")
    types = [gguf.GGMLQuantizationType[t] for t in G.supported_types()]
    rng = random.Random(1)
    vocab = eng.model_config.vocab_size

    def run() -> float:
        eng.add_request([rng.randrange(vocab) for _ in range(128)],
                        SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True))
        eng.step()  # the prompt
        steps = []
        while eng.has_unfinished():
            t = time.perf_counter()
            eng.step()
            steps.append(time.perf_counter() - t)
        return statistics.median(steps) * 1e3

    res: dict[int, list[float]] = {v: [] for v in values}
    run()  # warm-up
    for _ in range(args.rounds):
        for v in values:
            for t in types:
                for fam in (0, 1):
                    mod.set_prefetch(int(t), fam, v)
            res[v].append(run())
    print(f"{args.model}, path {G.cpu_path()}, {args.threads} threads: median decode step (ms) per round")
    for v, ts in res.items():
        print(f"  prefetch {v:>5d}: {' '.join(f'{t:.2f}' for t in ts)}  (median {statistics.median(ts):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
