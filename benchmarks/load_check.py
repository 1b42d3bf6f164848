"""What the non-finite weight check (llmopt.models.validate) costs on a model load.

Loads the model ``--repeats`` times; in each load the time spent inside ``check_finite`` is
measured next to the whole ``load_model`` time of the same load, so the share is a ratio from one
run on one machine. Usage: python benchmarks/load_check.py [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmopt.models import validate
from llmopt.models.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    original = validate.check_finite
    spent = [0.0]
    tensors = [0, 0]

    def timed(name, tensor, source):  # the same check, with a stopwatch around it
        t0 = time.perf_counter()
        original(name, tensor, source)
        spent[0] += time.perf_counter() - t0
        tensors[0] += 1
        tensors[1] += tensor.numel()

    validate.check_finite = timed
    load_model(args.model)  # warm the page cache and imports
    totals, checks = [], []
    for _ in range(args.repeats):
        spent[0], tensors[:] = 0.0, [0, 0]
        t0 = time.perf_counter()
        load_model(args.model)
        totals.append(time.perf_counter() - t0)
        checks.append(spent[0])
    share = [c / t for c, t in zip(checks, totals)]
    print(f"model {args.model}: {tensors[0]} tensors, {tensors[1] / 1e6:.1f} M values, "
          f"{args.threads} threads, {args.repeats} loads")
    print(f"load_model   median {statistics.median(totals) * 1000:8.1f} ms")
    print(f"check_finite median {statistics.median(checks) * 1000:8.1f} ms "
          f"({100 * statistics.median(share):.1f}% of the load, range {100 * min(share):.1f}-{100 * max(share):.1f}%)")


if __name__ == "__main__":
    main()
