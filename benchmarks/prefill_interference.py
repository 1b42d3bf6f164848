"""TPOT of running streams while a long prompt prefills, over loopback HTTP.

    python benchmarks/prefill_interference.py [--budgets 2048,256] [--streams 4] [--long-tokens 1900]
        [--model smollm2-135m-instruct] [--threads 2]

For each ``--max-num-batched-tokens`` budget it starts ``llmopt serve`` on a free loopback port,
opens ``--streams`` streaming completions (``ignore_eos``, 96 tokens each) and, once every stream
has produced 8 tokens, sends one long prompt (``--long-tokens`` tokens, ``max_tokens: 1``). The
engine schedules running decodes first and gives the long prompt what is left of the step's token
budget (chunked prefill), so the streams keep flowing; what the budget decides is how long each
step containing a prefill chunk takes. It reports the streams' inter-token gaps (ITL) before the
long request, during its prefill (sent -> answered) and after, and the long request's latency.
Numbers are from one run on one machine: compare the rows with each other, not with other runs.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import statistics
import time
from pathlib import Path

import httpx
from _server import start_server


async def stream(http: httpx.AsyncClient, model: str, times: list[float], ready: asyncio.Event) -> None:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 96, "temperature": 0, "stream": True,
            "ignore_eos": True}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                times.append(time.perf_counter())
                if len(times) >= 8:
                    ready.set()


def gaps_in(all_times: list[list[float]], lo: float, hi: float) -> list[float]:
    return [b - a for ts in all_times for a, b in itertools.pairwise(ts) if lo <= b <= hi]


def fmt(xs: list[float]) -> str:
    if not xs:
        return "    -    "
    xs = sorted(xs)
    return f"{statistics.mean(xs) * 1000:6.0f} / {xs[-1] * 1000:6.0f}"


async def measure(url: str, model: str, streams: int, long_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        times: list[list[float]] = [[] for _ in range(streams)]
        readies = [asyncio.Event() for _ in range(streams)]
        tasks = [asyncio.create_task(stream(http, model, times[i], readies[i])) for i in range(streams)]
        await asyncio.gather(*(e.wait() for e in readies))
        long_prompt = list(range(1000, 1000 + long_tokens))  # token ids: exactly long_tokens tokens
        t_sent = time.perf_counter()
        r = await http.post("/v1/completions", json={"model": model, "prompt": long_prompt, "max_tokens": 1})
        t_done = time.perf_counter()
        r.raise_for_status()
        await asyncio.gather(*tasks)
    start = min(ts[0] for ts in times)
    end = max(ts[-1] for ts in times)
    return {"before": gaps_in(times, start, t_sent), "during": gaps_in(times, t_sent, t_done),
            "after": gaps_in(times, t_done, end), "long_s": t_done - t_sent}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--budgets", default="2048,256", help="--max-num-batched-tokens values to compare")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--long-tokens", type=int, default=1900)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        proc, url = start_server(args.model, ["--num-threads", str(args.threads), "--max-num-batched-tokens",
                                              str(budget), "--max-model-len", "2048", "--kv-cache-gb", "0.5"],
                                 Path(f"/tmp/prefill-interference-{budget}.log"))
        try:
            rows.append((budget, asyncio.run(measure(url, args.model, args.streams, args.long_tokens))))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    print(f"{args.streams} streams of 96 tokens; one {args.long_tokens}-token prompt arrives after 8 tokens; "
          f"{args.threads} threads; {args.model}")
    print("budget | stream ITL mean / max (ms): before | during the long prefill | after | long request (s)")
    for budget, m in rows:
        print(f"{budget:6d} | {fmt(m['before'])} | {fmt(m['during'])} | {fmt(m['after'])} | {m['long_s']:.2f}"
              f"   (gaps during: {len(m['during'])})")


if __name__ == "__main__":
    main()
