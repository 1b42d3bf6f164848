"""Data parallel on Ray vs one process: the same 16-case batch through

  A. one process, one LLMEngine with 2 torch threads (plain `llmopt run --threads 2`), and
  B. a local Ray cluster, 2 workers x 1 thread (`llmopt run --ray local --workers 2 --threads-per-worker 1`),

side by side in one run, plus Ray's own cost: per case, the time the driver sees minus the time
inside the worker, and the round trip of an empty actor call. Prints numbers (docs/scale.md).

    nice -n 10 python benchmarks/bench_ray.py [--cases 16] [--questions 2] [--max-tokens 32]
    nice -n 10 python benchmarks/bench_ray.py --stream-only 2000   # the serve front end's cost per token
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmopt.batch import BatchRun, RunOptions, load_batch
from llmopt.batch.ray_runner import RayBatchRun, WorkerPool
from llmopt.config import EngineConfig
from llmopt.distributed.cluster import connect, require_ray

QUESTIONS = ["What is 17 * 23?", "Name three primary colors.", "What is the capital of France?",
             "Explain photosynthesis in one sentence.", "What is 144 / 12?", "Write a haiku about rain.",
             "Who wrote Hamlet?", "What is 2 to the power of 10?"]


def write_batch(path: Path, cases: int, questions: int, concurrency: int) -> Path:
    lines = []
    for i in range(cases):
        qs = [{"id": j, "content": QUESTIONS[(i * questions + j) % len(QUESTIONS)]} for j in range(questions)]
        lines.append(json.dumps({"id": f"case-{i}", "concurrency": concurrency, "questions": qs}))
    path.write_text("\n".join(lines) + "\n")
    return path


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Streamer:
    """A Ray actor that streams ``n`` small items, as a replica streams engine outputs."""

    async def stream(self, n: int):
        for i in range(n):
            yield i, "token"


def stream_cost(ray, items: int) -> tuple[float, float]:
    """(ms per streamed item, items/s) seen by an asyncio consumer, as the serve front end reads them."""
    import asyncio

    actor = ray.remote(num_cpus=0)(Streamer).remote()

    async def consume(n: int) -> None:
        async for ref in actor.stream.options(num_returns="streaming").remote(n):
            await ref

    asyncio.run(consume(10))
    t0 = time.perf_counter()
    asyncio.run(consume(items))
    took = time.perf_counter() - t0
    ray.kill(actor)
    return took * 1000 / items, items / took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--questions", type=int, default=2, help="questions per case")
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--calls", type=int, default=200, help="empty actor calls for the round-trip cost")
    ap.add_argument("--stream-only", type=int, default=0, metavar="ITEMS",
                    help="only measure the cost of ITEMS streamed items (the serve front end's per-token cost)")
    args = ap.parse_args()
    ray = require_ray()
    if args.stream_only:
        cluster = connect("local", num_cpus=2)
        ms, rate = stream_cost(ray, args.stream_only)
        print(f"Ray streaming generator: {ms:.3f} ms per item ({rate:,.0f} items/s, {args.stream_only} items, "
              f"one asyncio consumer); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        cluster.shutdown()
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench_ray"))
    batch = load_batch(write_batch(tmp / "cases.jsonl", args.cases, args.questions, args.concurrency))
    opts = RunOptions(max_tokens=args.max_tokens, concurrency=args.concurrency)
    print(f"workload: {args.cases} cases x {args.questions} questions, concurrency {args.concurrency}, "
          f"max_tokens {args.max_tokens}, model {args.model}; load average before: {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores", flush=True)

    # A: one process, 2 threads
    from llmopt.engine.engine import LLMEngine

    t0 = time.perf_counter()
    engine = LLMEngine(args.model, EngineConfig(num_threads=2, kv_cache_memory_gb=0.5))
    run_a = BatchRun(batch, tmp / "a.jsonl", opts, resume=False)
    load_a = time.perf_counter() - t0
    t0 = time.perf_counter()
    sa = run_a.run(engine)
    wall_a = time.perf_counter() - t0 - (run_a.warmup_s or 0.0)
    del engine
    import gc

    gc.collect()

    # B: Ray, 2 workers x 1 thread
    t0 = time.perf_counter()
    cluster = connect("local", num_cpus=2)
    cluster_s = time.perf_counter() - t0
    pool = WorkerPool(args.model, EngineConfig(num_threads=1, kv_cache_memory_gb=0.5), None, workers=2, threads=1)
    rb = RayBatchRun(BatchRun(batch, tmp / "b.jsonl", opts, resume=False), pool)
    t0 = time.perf_counter()
    sb = rb.run()
    wall_b = time.perf_counter() - t0
    # Ray's round trip for an empty call on a warm actor
    actor = pool.slots[0].actor
    ray.get(actor.ready.remote())
    t0 = time.perf_counter()
    for _ in range(args.calls):
        ray.get(actor.ready.remote())
    rtt_ms = (time.perf_counter() - t0) * 1000 / args.calls
    pool.close()
    cluster.shutdown()

    same = [x["result"]["results"] for x in map(json.loads, (tmp / "a.jsonl").read_text().splitlines())] == \
           [x["result"]["results"] for x in map(json.loads, (tmp / "b.jsonl").read_text().splitlines())]
    toks_a, toks_b = sa.output_tokens, sb.output_tokens
    print(f"\n{'':34}{'A: 1 proc x 2 thr':>20}{'B: Ray 2 x 1 thr':>20}{'B/A':>8}")
    print(f"{'startup (load + warm-up) s':34}{load_a + (run_a.warmup_s or 0):>20.1f}"
          f"{cluster_s + pool.startup_s:>20.1f}")
    print(f"{'wall time of the 16 cases s':34}{wall_a:>20.2f}{wall_b:>20.2f}{wall_b / wall_a:>8.2f}")
    print(f"{'output tokens':34}{toks_a:>20}{toks_b:>20}")
    print(f"{'throughput tokens/s (wall)':34}{toks_a / wall_a:>20.1f}{toks_b / wall_b:>20.1f}"
          f"{(toks_b / wall_b) / (toks_a / wall_a):>8.2f}")
    mean_a = statistics.mean(c.duration_ms for c in sa.ran)
    mean_b = statistics.mean(c.duration_ms for c in sb.ran)
    print(f"{'mean case duration ms':34}{mean_a:>20.1f}{mean_b:>20.1f}{mean_b / mean_a:>8.2f}")
    print(f"answers identical (greedy): {same}")
    ov = rb.summary.overhead_ms
    print(f"\nRay per case (driver-seen minus inside-worker), {len(ov)} cases: median {statistics.median(ov):.2f} ms, "
          f"p90 {pct(ov, 0.9):.2f} ms, max {max(ov):.2f} ms")
    print(f"Ray empty actor call round trip: {rtt_ms:.2f} ms ({args.calls} calls)")
    print(f"cluster start {cluster_s:.1f} s, 2 workers started + model loaded + warmed {pool.startup_s:.1f} s")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
