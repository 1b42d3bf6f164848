"""Serving benchmark: a concurrency sweep against ``llmopt serve`` over loopback HTTP.

    .venv/bin/python benchmarks/bench_serve.py [--concurrency 1,4,16] [--requests-per-level 2]
        [--max-tokens 32] [--model smollm2-135m-instruct] [--threads 2] [--url http://127.0.0.1:8000]
        [--out benchmarks/results/serve_bench.json]

Without ``--url`` it starts ``llmopt serve MODEL`` on a free loopback port, waits for /health, and
stops it with SIGTERM at the end. At each concurrency level C it keeps C streaming
``/v1/completions`` requests in flight (closed loop; ``--requests-per-level`` x C requests in all),
each with ``ignore_eos`` so every request generates exactly ``--max-tokens`` tokens, and reports
(the metrics of vLLM's ``benchmark_serving``):

- TTFT: request sent -> first token chunk received;
- TPOT: (last chunk - first chunk) / (output tokens - 1), per request;
- ITL: the gap between consecutive token chunks;
- output tokens/s and requests/s over the level's wall time.

Percentiles are p50 / p90 / p99 over the level's requests (ITL: over all gaps). Prints a table and
never asserts anything about time: on a shared machine the numbers are noisy, so quote ratios
measured side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from _server import start_server

PROMPTS = ["The capital of France is", "Water boils at", "Write a short poem about the sea.",
           "List three prime numbers:", "The history of the printing press", "Explain gravity to a child.",
           "My favourite food is", "Once upon a time, in a small village,"]


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = 0
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    return Result(False, error=data["error"]["message"])
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                if data.get("choices") and data["choices"][0].get("text"):
                    times.append(time.perf_counter())
    except httpx.HTTPError as e:
        return Result(False, error=f"{type(e).__name__}: {e}")
    if not times:
        return Result(False, error="no tokens")
    return Result(True, ttft=times[0] - t0, e2e=times[-1] - t0, tokens=tokens or len(times),
                  itl=[b - a for a, b in zip(times, times[1:])])


async def run_level(url: str, headers: dict, model: str, concurrency: int, total: int, max_tokens: int
                    ) -> tuple[list[Result], float]:
    todo = list(range(total))
    results: list[Result] = []
    limits = httpx.Limits(max_connections=concurrency + 4)

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as http:
        async def worker():
            while todo:
                i = todo.pop()
                results.append(await one_request(http, model, PROMPTS[i % len(PROMPTS)], max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return results, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(concurrency: int, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    itl = [g for r in ok for g in r.itl]
    out_tokens = sum(r.tokens for r in ok)
    row = {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
           "wall_s": wall, "output_tok_s": out_tokens / wall if wall else 0.0, "req_s": len(ok) / wall if wall else 0.0}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        for q in (0.5, 0.9, 0.99):
            row[f"{name}_p{int(q * 100)}_ms"] = 1000 * pct(xs, q)
        row[f"{name}_mean_ms"] = 1000 * statistics.fmean(xs) if xs else float("nan")
    row["first_error"] = next((r.error for r in results if not r.ok), "")
    return row


def print_table(rows: list[dict]) -> None:
    cols = [("conc", "concurrency", "{:d}"), ("reqs", "requests", "{:d}"), ("err", "errors", "{:d}"),
            ("out tok/s", "output_tok_s", "{:.1f}"), ("req/s", "req_s", "{:.2f}"),
            ("TTFT p50", "ttft_p50_ms", "{:.0f}"), ("TTFT p90", "ttft_p90_ms", "{:.0f}"),
            ("TTFT p99", "ttft_p99_ms", "{:.0f}"), ("TPOT p50", "tpot_p50_ms", "{:.1f}"),
            ("TPOT p90", "tpot_p90_ms", "{:.1f}"), ("ITL p50", "itl_p50_ms", "{:.1f}"),
            ("ITL p90", "itl_p90_ms", "{:.1f}"), ("ITL p99", "itl_p99_ms", "{:.1f}")]
    cells = [[fmt.format(r[key]) for _, key, fmt in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(cols)]
    print("| " + " | ".join(h.rjust(w) for (h, _, _), w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for c in cells:
        print("| " + " | ".join(x.rjust(w) for x, w in zip(c, widths)) + " |")
    print("(times in ms; TTFT = request sent -> first token; TPOT per request; ITL over all token gaps)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="benchmark a running server instead of starting one")
    ap.add_argument("--api-key", default=os.environ.get("LLMOPT_API_KEY"))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    ap.add_argument("--requests-per-level", type=int, default=2, help="requests per level = this x concurrency")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="server torch threads (when started here)")
    ap.add_argument("--out", type=Path, help="write the rows and machine info as JSON")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]

    proc = None
    url = args.url
    if url is None:
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_serve_{os.getpid()}.log"
        print(f"starting llmopt serve {args.model} ({args.threads} threads; log {log_path}) ...", flush=True)
        proc, url = start_server(args.model, ["--num-threads", str(args.threads), "--max-num-seqs", str(max(levels)),
                                              "--kv-cache-gb", "0.5"], log_path)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        # warm-up: the first requests pay one-time costs (allocation, kernel load)
        asyncio.run(run_level(url, headers, args.model, 1, 2, 4))
        rows = []
        for c in levels:
            results, wall = asyncio.run(run_level(url, headers, args.model, c, args.requests_per_level * c,
                                                  args.max_tokens))
            rows.append(summarize(c, results, wall))
            print(f"  concurrency {c}: {rows[-1]['output_tok_s']:.1f} output tok/s, "
                  f"{rows[-1]['errors']} errors", flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"\nllmopt serve {args.model}: {args.max_tokens} output tokens per request (ignore_eos), "
          f"loopback HTTP, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print_table(rows)
    for r in rows:
        if r["errors"]:
            print(f"concurrency {r['concurrency']}: first error: {r['first_error']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                    "loadavg": os.getloadavg()}}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
