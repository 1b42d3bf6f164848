"""HTTP requests as jobs on the ``AsyncEngine``, with bounded admission.

Each HTTP request is a ``Job`` of ``n`` engine sequences (``<id>-<index>``) feeding one asyncio
queue. Admission is bounded: at most ``max_num_seqs`` sequences run and ``max_queue`` more wait;
beyond that the server answers 503 with ``Retry-After`` at once, and a request that needs more than
``max_num_seqs + max_queue`` sequences by itself, which no wait could admit, gets 400. A job ends
exactly once (``Job.close``): finished, failed, timed out, or its client went away; closing an unfinished job
aborts its sequences, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from fastapi import Request

from llmopt.engine.async_engine import AsyncEngine, EngineError
from llmopt.engine.engine import LLMEngine
from llmopt.engine.sampling_params import SamplingParams
from llmopt.engine.sequence import RequestOutput
from llmopt.serve.config import MAX_FAILED_STEPS
from llmopt.serve.errors import APIError, from_engine_error

if TYPE_CHECKING:
    from llmopt.serve.metrics import ServerMetrics


class Job:
    """One HTTP request: ``n`` engine sequences whose outputs arrive on one asyncio queue."""

    def __init__(self, jobs: JobQueue, request_id: str, n: int):
        self.jobs = jobs
        self.request_id = request_id
        self.n = n
        self.arrival = time.perf_counter()
        self.aio_loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, RequestOutput | APIError]] = asyncio.Queue()
        self.num_finished = 0
        self.closed = False
        self.request: Request | None = None  # polled for a client disconnect while set
        self.end_reason = "abort"  # why unfinished sequences end if the job closes early

    def engine_ids(self) -> list[str]:
        return [f"{self.request_id}-{i}" for i in range(self.n)]

    def push(self, index: int, item: RequestOutput | EngineError) -> None:
        """The engine's sink for this job (called from the stepping thread)."""
        out: RequestOutput | APIError = from_engine_error(item) if isinstance(item, EngineError) else item
        try:
            self.aio_loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    @property
    def done(self) -> bool:
        return self.num_finished >= self.n

    def close(self) -> None:
        """End the job (idempotent; event-loop thread only): abort what is unfinished, free the slot."""
        if self.closed:
            return
        self.closed = True
        if not self.done:
            self.jobs.engine.abort(self.engine_ids())
            if self.jobs.metrics is not None:
                self.jobs.metrics.finished.labels(self.end_reason).inc(self.n - self.num_finished)
        self.jobs.release(self.n)


class JobQueue:
    """Admission of jobs onto one ``AsyncEngine`` (event-loop thread only)."""

    def __init__(self, engine: LLMEngine, max_queue: int, backend: Any = None):
        # backend: what steps the engine: an AsyncEngine over ``engine`` (the default), or any object
        # with its surface, e.g. llmopt.distributed.replicas.ReplicaSet for engine replicas on Ray
        self.engine = backend if backend is not None else AsyncEngine(engine, max_failed_steps=MAX_FAILED_STEPS)
        self.capacity = engine.config.max_num_seqs + max_queue
        self.inflight = 0  # admitted sequences not yet closed
        self.draining = False  # set on SIGTERM: no new requests
        self.metrics: ServerMetrics | None = None

    def start(self) -> None:
        self.engine.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.engine.stop(timeout)

    @property
    def alive(self) -> bool:
        return self.engine.alive

    @property
    def error(self) -> str | None:
        return self.engine.error

    def check_alive(self) -> None:
        if self.engine.dead:
            raise APIError(503, f"the engine thread died ({self.engine.error or 'exited'}); restart the server",
                           code="engine_dead")

    def check_admissible(self, n: int, param: str) -> None:
        """400 for a request of ``n`` sequences that could never be admitted, even on an idle server
        (a 503 would tell the client to retry the same request forever)."""
        if n > self.capacity:
            raise APIError(400, f"{param}: this request needs {n} sequences (prompts x n) but the server admits at "
                                f"most {self.capacity} at once (--max-num-seqs + --max-queue); send fewer prompts "
                                f"or a smaller n per request", param=param, code="too_many_sequences")

    def admit(self, request_id: str, n: int, retry_after: int) -> Job:
        self.check_alive()
        self.check_admissible(n, "n")
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.inflight + n > self.capacity:
            raise APIError(503, f"the server is at capacity ({self.inflight} sequences running or waiting, "
                                f"limit {self.capacity}); retry later", code="queue_full",
                           headers={"Retry-After": str(retry_after)})
        self.inflight += n
        return Job(self, request_id, n)

    def release(self, n: int) -> None:
        self.inflight -= n

    def submit(self, job: Job, items: list[tuple[list[int], SamplingParams]]) -> None:
        self.engine.submit(job.engine_ids(), items, job.push)

    def queue_depth(self) -> int:
        """Submitted but not yet running: the inbox plus the scheduler's waiting queue."""
        return self.engine.inbox_size() + self.engine.num_waiting()
