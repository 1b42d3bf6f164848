"""Engine replicas on Ray behind one front end (``llmopt serve --replicas N``).

Each replica is a Ray actor holding one ``LLMEngine`` stepped by its own ``AsyncEngine`` thread;
requests stream back through Ray's streaming generators, one ``(index, RequestOutput)`` per engine
output. On the front end, ``ReplicaSet`` stands where the serve app's ``AsyncEngine`` stands (same
``submit`` / ``abort`` / ``running_ids`` / ``num_waiting`` surface), and ``ReplicaView`` stands where
its ``LLMEngine`` stands (tokenizer, context length, aggregated stats and KV blocks), so the
FastAPI app, its validation, admission, streaming and errors are the same code as with one engine.

Routing (``PrefixRouter``): a request goes to the replica that already holds the longest run of
its prompt's leading KV blocks (the same block-chained hashes as the prefix cache), when that run
covers at least ``min_match`` of the prompt; otherwise to the least loaded replica. A finished
request teaches the router its prompt *and* answer, so the next turn of a conversation (which
repeats both) returns to the replica whose prefix cache holds them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from llmopt.config import EngineConfig
from llmopt.distributed.cluster import require_ray
from llmopt.engine.async_engine import EngineDead, EngineError
from llmopt.engine.engine import LLMEngine
from llmopt.engine.sampling_params import SamplingParams
from llmopt.engine.sequence import RequestOutput

log = logging.getLogger(__name__)

Item = tuple[list[int], SamplingParams]


class PrefixRouter:
    """Which replica gets a prompt: longest cached prefix, else least load (see the module doc)."""

    def __init__(self, replicas: int, block_size: int = 16, min_match: float = 0.5, capacity: int = 65536):
        self.n, self.block_size, self.min_match, self.capacity = replicas, block_size, min_match, capacity
        self.blocks: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(replicas)]  # LRU per replica
        self.routed = [0] * replicas

    def hashes(self, ids: Sequence[int]) -> list[int]:
        """Chained hashes of the full blocks of ``ids`` (block i's hash covers blocks 0..i)."""
        out, h, bs = [], 0, self.block_size
        for start in range(0, len(ids) - bs + 1, bs):
            h = hash((h, tuple(ids[start:start + bs])))
            out.append(h)
        return out

    def matched(self, replica: int, hashes: list[int]) -> int:
        """Leading blocks of ``hashes`` that ``replica`` was sent before."""
        seen, n = self.blocks[replica], 0
        for h in hashes:
            if h not in seen:
                break
            n += 1
        return n

    def choose(self, ids: Sequence[int], load: Sequence[int], alive: Sequence[bool] | None = None) -> int:
        alive = alive if alive is not None and any(alive) else [True] * self.n
        hashes = self.hashes(ids)
        candidates = [r for r in range(self.n) if alive[r]]
        match = {r: self.matched(r, hashes) for r in candidates}
        best = max(match.values())
        if best and best * self.block_size >= self.min_match * len(ids):
            pick = min((r for r in candidates if match[r] == best), key=lambda r: (load[r], self.routed[r], r))
        else:
            pick = min(candidates, key=lambda r: (load[r], -match[r], self.routed[r], r))
        self.routed[pick] += 1
        self.learn(pick, ids, hashes)
        return pick

    def learn(self, replica: int, ids: Sequence[int], hashes: list[int] | None = None) -> None:
        """``replica`` now holds the KV of ``ids`` (prompt, or prompt + answer once finished)."""
        seen = self.blocks[replica]
        for h in hashes if hashes is not None else self.hashes(ids):
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.capacity:
            seen.popitem(last=False)


class EngineReplica:
    """A Ray actor (async: its methods run on one event loop, the engine steps in its own thread)."""

    def __init__(self, model: str, config: EngineConfig, quant: str | None):
        from llmopt.engine.async_engine import AsyncEngine
        from llmopt.kernels.build import warm_kernels

        self.engine = LLMEngine(model, config, quant=quant)
        warm_kernels()  # no compilation or first-call setup inside a client's request
        self.engine.generate(["Hello"], SamplingParams(max_tokens=2, temperature=0.0))
        self.stepper = AsyncEngine(self.engine, max_failed_steps=3)
        self.stepper.start()
        self.queues: dict[str, asyncio.Queue] = {}

    def info(self) -> dict[str, Any]:
        e = self.engine
        return {"pid": os.getpid(), "max_model_len": e.max_model_len, "num_blocks": e.block_manager.num_blocks,
                "block_size": e.block_manager.block_size, "max_num_seqs": e.config.max_num_seqs,
                "vocab_size": e.model_config.vocab_size}

    async def generate(self, key: str, request_ids: list[str], items: list[Item]):
        """Outputs of ``items`` as ``(index, RequestOutput | EngineError)`` until each has finished."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self.queues[key] = q
        self.stepper.submit(request_ids, items, lambda i, out: loop.call_soon_threadsafe(q.put_nowait, (i, out)))
        left = len(items)
        try:
            while left:
                item = await q.get()
                if item is None:  # aborted by the front end
                    return
                i, out = item
                if isinstance(out, EngineError) or out.finished:
                    left -= 1
                yield i, out
        finally:
            self.queues.pop(key, None)
            if left:
                self.stepper.abort(request_ids)

    async def abort(self, key: str, request_ids: list[str]) -> None:
        self.stepper.abort(request_ids)
        q = self.queues.get(key)
        if q is not None:
            q.put_nowait(None)

    async def stats(self) -> dict[str, Any]:
        s, bm = self.stepper, self.engine.block_manager
        return {"stats": dict(self.engine.stats), "running": s.running_ids(), "waiting": s.num_waiting(),
                "inbox": s.inbox_size(), "kv_used": bm.num_used_blocks, "kv_total": bm.num_blocks,
                "alive": s.alive, "error": s.error}


@dataclass
class ReplicaState:
    actor: Any
    info: dict[str, Any]
    load: int = 0  # sequences submitted and not finished
    routed: int = 0  # requests sent
    alive: bool = True
    last: dict[str, Any] | None = None  # the last stats() answer


class ReplicaSet:
    """N ``EngineReplica`` actors as one AsyncEngine-like backend for the serve app (event-loop thread)."""

    def __init__(self, model: str, config: EngineConfig, quant: str | None, replicas: int, threads: int,
                 max_restarts: int = 3, stats_timeout: float = 5.0):
        ray = self.ray = require_ray()
        cls = ray.remote(num_cpus=threads, max_restarts=max_restarts, max_concurrency=1000)(EngineReplica)
        actors = [cls.remote(model, config, quant) for _ in range(replicas)]
        try:
            infos = ray.get([a.info.remote() for a in actors])
        except ray.exceptions.RayActorError as e:
            for a in actors:
                ray.kill(a, no_restart=True)
            cause = getattr(e, "cause", None)
            raise RuntimeError(f"a Ray replica could not load {model!r}: {cause or e}") from None
        self.replicas = [ReplicaState(a, info) for a, info in zip(actors, infos)]
        self.router = PrefixRouter(replicas, infos[0]["block_size"])
        self.owner: dict[str, tuple[int, str]] = {}  # engine request id -> (replica, stream key)
        self.tasks: set[asyncio.Task] = set()
        self.stats_timeout = stats_timeout
        self.error: str | None = None
        self._started = False
        self.engine: Any = None  # the ReplicaView, once built

    # ---- the AsyncEngine surface ----------------------------------------------------------------
    def start(self) -> None:
        self._started = True

    def stop(self, timeout: float = 10.0) -> None:
        for t in list(self.tasks):
            t.cancel()
        for r in self.replicas:
            try:
                self.ray.kill(r.actor, no_restart=True)
            except Exception:
                pass
        self._started = False

    @property
    def started(self) -> bool:
        return self._started

    @property
    def alive(self) -> bool:
        return self._started and any(r.alive for r in self.replicas)

    @property
    def dead(self) -> bool:
        return self._started and not any(r.alive for r in self.replicas)

    def submit(self, request_ids: Sequence[str], items: Sequence[Item], sink: Any) -> None:
        if len(request_ids) != len(items):
            raise ValueError(f"{len(request_ids)} request ids for {len(items)} items")
        pick = self.router.choose(items[0][0], [r.load for r in self.replicas], [r.alive for r in self.replicas])
        rep = self.replicas[pick]
        rep.load += len(items)
        rep.routed += 1
        key = request_ids[0]
        for rid in request_ids:
            self.owner[rid] = (pick, key)
        stream = rep.actor.generate.options(num_returns="streaming").remote(key, list(request_ids), list(items))
        task = asyncio.get_running_loop().create_task(self._pump(pick, list(request_ids), list(items), stream, sink))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _pump(self, pick: int, request_ids: list[str], items: list[Item], stream: Any, sink: Any) -> None:
        rep, done, seen = self.replicas[pick], set(), set()
        try:
            async for ref in stream:
                i, out = await ref
                if isinstance(out, RequestOutput):
                    now = time.perf_counter()  # the replica's clock may be another machine's
                    if i not in seen and out.token_ids:
                        seen.add(i)
                        out.metrics.first_token_time = now
                    if out.finished:
                        out.metrics.finish_time = now
                        self.router.learn(pick, list(items[i][0]) + list(out.token_ids))
                if isinstance(out, EngineError) or out.finished:
                    done.add(i)
                sink(i, out)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the replica died (or the stream broke): fail what is left, fast
            rep.alive = False
            why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log.warning("replica %d failed while streaming (%s)", pick, why)
            for i in range(len(items)):
                if i not in done:
                    sink(i, EngineDead(f"engine replica {pick} died ({why}); retry the request"))
        finally:
            rep.load -= len(items)
            for rid in request_ids:
                self.owner.pop(rid, None)

    def abort(self, request_ids: Sequence[str]) -> None:
        groups: dict[tuple[int, str], list[str]] = {}
        for rid in request_ids:
            where = self.owner.get(rid)
            if where is not None:
                groups.setdefault(where, []).append(rid)
        for (pick, key), rids in groups.items():
            self.replicas[pick].actor.abort.remote(key, rids)

    def inbox_size(self) -> int:
        return sum(r.last["inbox"] for r in self.replicas if r.last)

    def running_ids(self) -> list[str]:
        return [rid for r in self.replicas if r.last for rid in r.last["running"]]

    def num_waiting(self) -> int:
        return sum(r.last["waiting"] for r in self.replicas if r.last)

    # ---- stats ----------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Fetch every replica's stats (used by /metrics and /health); a replica that does not answer
        within ``stats_timeout`` counts as dead until it answers again."""
        async def one(r: ReplicaState) -> None:
            try:
                r.last = await asyncio.wait_for(r.actor.stats.remote(), self.stats_timeout)
                r.alive = bool(r.last["alive"])
            except Exception as e:
                r.alive = False
                self.error = f"replica {self.replicas.index(r)}: {type(e).__name__}"

        await asyncio.gather(*(one(r) for r in self.replicas))
        if any(r.alive for r in self.replicas):
            self.error = None

    def total(self, key: str) -> int:
        return sum(r.last["stats"].get(key, 0) for r in self.replicas if r.last)

    def replica_metrics(self) -> list[tuple[str, str, list[float]]]:
        """(name, help, value per replica) for labelled gauges on /metrics."""
        def last(key: str, sub: str | None = None) -> list[float]:
            return [float((r.last["stats"] if sub else r.last).get(sub or key, 0)) if r.last else 0.0
                    for r in self.replicas]

        return [("llmopt_replica_alive", "1 while the replica answers", [float(r.alive) for r in self.replicas]),
                ("llmopt_replica_routed_requests", "Requests routed to the replica",
                 [float(r.routed) for r in self.replicas]),
                ("llmopt_replica_load", "Sequences in flight on the replica", [float(r.load) for r in self.replicas]),
                ("llmopt_replica_prompt_tokens", "Prompt tokens received by the replica", last("", "prompt_tokens")),
                ("llmopt_replica_computed_prefill_tokens", "Prompt tokens the replica computed (not served by "
                 "its prefix cache)", last("", "computed_prefill_tokens")),
                ("llmopt_replica_generation_tokens", "Tokens generated by the replica",
                 last("", "generated_tokens")),
                ("llmopt_replica_kv_blocks_used", "KV cache blocks in use on the replica", last("kv_used"))]


class _Blocks:
    def __init__(self, rs: ReplicaSet):
        self.rs = rs
        self.block_size = rs.replicas[0].info["block_size"]
        self.num_blocks = sum(r.info["num_blocks"] for r in rs.replicas)

    @property
    def num_used_blocks(self) -> int:
        return sum(r.last["kv_used"] for r in self.rs.replicas if r.last)


class ReplicaView:
    """What the serve app reads from its ``LLMEngine``, for a ``ReplicaSet``: the tokenizer (loaded
    here, without the weights), the context length every replica fits, the admission size (all
    replicas' ``max_num_seqs``), and stats and KV blocks summed over the replicas."""

    encode_prompt = LLMEngine.encode_prompt  # uses only .tokenizer and .model_config.vocab_size

    def __init__(self, model: str, rs: ReplicaSet):
        from llmopt.models.loader import open_checkpoint

        _, self.tokenizer, _, path = open_checkpoint(model)
        self.rs = rs
        self.model_config = SimpleNamespace(vocab_size=rs.replicas[0].info["vocab_size"])
        self.max_model_len = min(r.info["max_model_len"] for r in rs.replicas)
        self.config = SimpleNamespace(max_num_seqs=sum(r.info["max_num_seqs"] for r in rs.replicas))
        self.block_manager = _Blocks(rs)
        self.loaded = SimpleNamespace(source=Path(path))
        rs.engine = self  # where the serve app's metrics look for the engine under the stepping loop

    @property
    def stats(self) -> dict[str, int]:
        keys = ("prompt_tokens", "generated_tokens", "computed_prefill_tokens", "steps")
        return {k: self.rs.total(k) for k in keys}
