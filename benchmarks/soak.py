"""Soak test of ``llmopt serve``: mixed valid and invalid traffic from concurrent clients, bounded
and self-stopping, loopback only.

    python benchmarks/soak.py [--minutes 3] [--clients 16] [--model smollm2-135m-instruct]
        [--threads 2] [--seed 0] [--url http://127.0.0.1:PORT --pid PID]

Without ``--url`` it starts ``llmopt serve MODEL`` on a free loopback port and stops it with
SIGTERM at the end (its exit code is reported). ``--url`` must be a loopback address; give the
server's ``--pid`` to sample its memory. ``--minutes 30`` is the real soak; the default is short.

Each of ``--clients`` clients loops until the deadline, picking a request kind at random
(``--seed``): valid ones (completion, streamed completion, chat, a stream the client drops after a
few chunks, /health) and invalid ones (malformed JSON, unknown field, prompt over the context, a
9 MiB body, a text/plain body, more sequences than the server admits, an upload cut short). Every
request has a client timeout; one that hits it counts as hung. The server's RSS is sampled every
5 s. At the end it prints, per kind: count, status codes, p50 / p99 latency; errors by class
(5xx on valid requests, unexpected statuses, exceptions, hung requests); RSS over time; and the
issue's targets (0 5xx on valid requests, 0 lost or hung, RSS flat within 10% after warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
from _server import start_server

TIMEOUT = 120.0  # seconds before a request counts as hung
MIB = 2**20

# kind -> (weight, the statuses that are right for it)
KINDS: dict[str, tuple[int, set[int]]] = {
    "complete": (20, {200}),
    "stream": (15, {200}),
    "chat": (15, {200}),
    "stream_dropped": (10, {200}),  # the client closes after a few chunks
    "health": (10, {200}),
    "bad_json": (5, {400}),
    "unknown_field": (5, {400}),
    "over_context": (4, {400}),
    "body_9mib": (3, {413}),
    "text_plain": (4, {415}),
    "too_many_seqs": (4, {400}),
    "upload_cut": (5, {499}),  # the client sees nothing: its status is the server's 499 (from /metrics)
}
VALID = {"complete", "stream", "chat", "stream_dropped", "health"}
PROMPTS = ["The capital of France is", "Water boils at", "List three prime numbers:", "Once upon a time,",
           "Explain gravity to a child.", "My favourite food is", "The history of the printing press"]


@dataclass
class Outcome:
    kind: str
    status: int | str  # HTTP status, or the exception class / "hung"
    seconds: float


@dataclass
class Soak:
    url: str
    model: str
    deadline: float
    rng: random.Random
    outcomes: list[Outcome] = field(default_factory=list)
    big_body: bytes = b"{" + b" " * (9 * MIB) + b"}"

    async def one(self, http: httpx.AsyncClient, kind: str) -> int | str:
        m, rng = self.model, self.rng
        prompt = rng.choice(PROMPTS)
        if kind == "health":
            return (await http.get("/health")).status_code
        if kind == "complete":
            return (await http.post("/v1/completions", json={"model": m, "prompt": prompt, "temperature": 0.7,
                                                              "max_tokens": rng.randint(4, 24)})).status_code
        if kind == "chat":
            return (await http.post("/v1/chat/completions", json={
                "model": m, "messages": [{"role": "user", "content": prompt}],
                "max_completion_tokens": rng.randint(4, 24), "temperature": 0})).status_code
        if kind in ("stream", "stream_dropped"):
            keep = rng.randint(1, 4) if kind == "stream_dropped" else None
            body = {"model": m, "prompt": prompt, "max_tokens": rng.randint(8, 32), "stream": True}
            async with http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return r.status_code
                n, done = 0, False
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: {"):
                        if '"error"' in line[:20]:
                            return "stream_error_event"
                        n += 1
                        if keep is not None and n >= keep:
                            return 200  # leave mid-stream: the server must abort and free the blocks
                return 200 if done else "stream_without_DONE"
        if kind == "bad_json":
            return (await http.post("/v1/completions", content=b'{"model": "x", "prompt": ',
                                    headers={"Content-Type": "application/json"})).status_code
        if kind == "unknown_field":
            return (await http.post("/v1/completions", json={"model": m, "prompt": prompt, "max_token": 5})).status_code
        if kind == "over_context":
            return (await http.post("/v1/completions", json={"model": m, "prompt": "hello " * 3000})).status_code
        if kind == "body_9mib":
            # Like a client that reads an early answer (curl, Expect: 100-continue): send the head, wait
            # briefly for the server's verdict on the Content-Length, only then the body. (A client that
            # writes the whole body first, as httpx does, sees the refusal as a reset connection.)
            host, port = urlparse(self.url).hostname, urlparse(self.url).port
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: "
                             f"application/json\r\nContent-Length: {len(self.big_body)}\r\n\r\n".encode())
                await writer.drain()
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
                except asyncio.TimeoutError:
                    writer.write(self.big_body)
                    await writer.drain()
                    head = await reader.readuntil(b"\r\n\r\n")
                return int(head.split(b" ", 2)[1])
            finally:
                writer.close()
        if kind == "text_plain":
            return (await http.post("/v1/completions", content=b'{"model": "%s", "prompt": "hi"}' % m.encode(),
                                    headers={"Content-Type": "text/plain"})).status_code
        if kind == "too_many_seqs":
            return (await http.post("/v1/completions", json={"model": m, "prompt": ["hi"] * 16, "n": 16,
                                                              "max_tokens": 1})).status_code
        if kind == "upload_cut":
            host, port = urlparse(self.url).hostname, urlparse(self.url).port
            _, writer = await asyncio.open_connection(host, port)
            writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json"
                         f"\r\nContent-Length: {MIB}\r\n\r\n".encode() + b'{"prompt": "' + b"x" * 20_000)
            await writer.drain()
            await asyncio.sleep(rng.uniform(0.01, 0.2))
            writer.close()
            await writer.wait_closed()
            return 499
        raise ValueError(kind)

    async def client(self) -> None:
        kinds = list(KINDS)
        weights = [KINDS[k][0] for k in kinds]
        async with httpx.AsyncClient(base_url=self.url, timeout=TIMEOUT) as http:
            while time.monotonic() < self.deadline:
                kind = self.rng.choices(kinds, weights)[0]
                t0 = time.perf_counter()
                try:
                    status = await asyncio.wait_for(self.one(http, kind), TIMEOUT)
                except asyncio.TimeoutError:
                    status = "hung"
                except (httpx.HTTPError, OSError) as e:
                    status = type(e).__name__
                self.outcomes.append(Outcome(kind, status, time.perf_counter() - t0))


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def sample_rss(pid: int | None, deadline: float, out: list[tuple[float, float]], t0: float) -> None:
    while pid is not None and time.monotonic() < deadline:
        r = rss_mib(pid)
        if r is not None:
            out.append((time.monotonic() - t0, r))
        await asyncio.sleep(5)


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))] if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--url", help="a running server on loopback (default: start one)")
    ap.add_argument("--pid", type=int, help="the --url server's process id, to sample its RSS")
    ap.add_argument("--log", default="soak-server.log", help="server log (when started here)")
    args = ap.parse_args()
    if not 0 < args.minutes <= 120:
        raise SystemExit("--minutes must be in (0, 120]")
    proc = None
    if args.url:
        host = urlparse(args.url).hostname or ""
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            raise SystemExit(f"--url must be a loopback address (got {host!r}): this script is a load generator")
        url, pid = args.url.rstrip("/"), args.pid
    else:
        proc, url = start_server(args.model, ["--num-threads", str(args.threads), "--max-model-len", "2048",
                                              "--kv-cache-gb", "0.5"], Path(args.log))
        pid = proc.pid
    t_start = time.monotonic()
    deadline = t_start + 60 * args.minutes
    soak = Soak(url, args.model, deadline, random.Random(args.seed))
    rss: list[tuple[float, float]] = []
    before = scrape(url)

    async def run() -> None:
        await asyncio.gather(sample_rss(pid, deadline, rss, t_start), *(soak.client() for _ in range(args.clients)))

    try:
        asyncio.run(run())
        time.sleep(2)
        after = scrape(url)
        health = httpx.get(f"{url}/health", timeout=30).json()
    finally:
        code = None
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = "killed after 120 s"
    wall = time.monotonic() - t_start
    outs = soak.outcomes
    print(f"soak: {len(outs)} requests from {args.clients} clients in {wall / 60:.1f} min against {url} "
          f"({args.model}, {args.threads} threads, seed {args.seed})")
    print(f"{'kind':16} {'n':>6}  {'p50 ms':>8} {'p99 ms':>8}  statuses")
    by_kind: dict[str, list[Outcome]] = collections.defaultdict(list)
    for o in outs:
        by_kind[o.kind].append(o)
    unexpected = collections.Counter()
    for kind in KINDS:
        os_ = by_kind.get(kind, [])
        statuses = collections.Counter(str(o.status) for o in os_)
        lat = [o.seconds * 1000 for o in os_]
        print(f"{kind:16} {len(os_):6d}  {pct(lat, 0.5):8.1f} {pct(lat, 0.99):8.1f}  "
              + ", ".join(f"{s}: {c}" for s, c in sorted(statuses.items())))
        for o in os_:
            if o.status not in KINDS[kind][1]:
                unexpected[(kind, str(o.status))] += 1
    valid = [o for o in outs if o.kind in VALID]
    valid_5xx = sum(1 for o in valid if isinstance(o.status, int) and o.status >= 500)
    hung = sum(1 for o in outs if o.status == "hung")
    lost = sum(1 for o in outs if isinstance(o.status, str))  # exceptions, hung, streams without [DONE]
    print("errors by class:")
    for (kind, status), c in sorted(unexpected.items()):
        print(f"  {kind} -> {status}: {c}")
    if not unexpected:
        print("  none")

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    server_codes = {k: delta(k) for k in after if k.startswith("llmopt_requests_total") and delta(k)}
    print("server-side counts (llmopt_requests_total, this run):")
    for k, v in sorted(server_codes.items()):
        print(f"  {k[len('llmopt_requests_total'):]}: {v:.0f}")
    cut = sum(1 for o in outs if o.kind == "upload_cut")
    seen_499 = delta('llmopt_requests_total{code="499",route="/v1/completions"}')
    seen_500 = sum(v for k, v in server_codes.items() if 'code="5' in k)
    print(f"uploads cut short: {cut}, counted by the server as 499: {seen_499:.0f}, server 5xx of any kind: "
          f"{seen_500:.0f}")
    print(f"server after the run: {health}")
    print("RSS over time (MiB):", "  ".join(f"{t / 60:.1f}m:{r:.0f}" for t, r in rss[::max(1, len(rss) // 12)]))
    warm = [r for t, r in rss if t >= 0.2 * wall]
    flat = (max(warm) - min(warm)) / min(warm) * 100 if warm else float("nan")
    lat_valid = [o.seconds * 1000 for o in valid if o.status == 200]
    print(f"p99 latency of valid requests: {pct(lat_valid, 0.99):.0f} ms (p50 {pct(lat_valid, 0.5):.0f} ms, "
          f"n={len(lat_valid)})")
    print(f"targets: 5xx on valid requests = {valid_5xx} (want 0); lost or hung = {lost} (hung {hung}; want 0); "
          f"RSS after warm-up {min(warm) if warm else float('nan'):.0f}-{max(warm) if warm else float('nan'):.0f} "
          f"MiB, spread {flat:.1f}% (want < 10%); server exit code {code}")
    ok = valid_5xx == 0 and lost == 0 and seen_500 == 0 and (not warm or flat < 10) and health.get("status") == "ok"
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
