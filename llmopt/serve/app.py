"""OpenAI-compatible HTTP server over one ``LLMEngine``.

Threads and queues::

    HTTP handlers (asyncio event loop)                       engine thread (EngineLoop._run)
      validate, tokenize, admit (bounded)  --inbox (SimpleQueue)-->  add_request / abort
      await per-request asyncio.Queue      <--call_soon_threadsafe--  step() -> RequestOutput

The engine thread is the only caller of ``add_request``, ``abort`` and ``step``. Each HTTP request
is a ``Job`` of ``n`` engine sequences (``<id>-<index>``) feeding one asyncio queue. Admission is
bounded: at most ``max_num_seqs`` sequences run and ``max_queue`` more wait; beyond that the server
answers 503 with ``Retry-After`` at once. A job ends exactly once (``Job.close``): finished,
failed, timed out, or its client went away; closing an unfinished job aborts its sequences, which
frees their KV blocks.

A step that raises fails the sequences it was running (500) and the loop goes on; three failing
steps in a row, or anything that escapes the loop, mark the engine dead: ``/health`` answers 503
and every waiting or new request fails at once instead of hanging.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmopt.engine.engine import LLMEngine
from llmopt.engine.sampling_params import SamplingParams
from llmopt.engine.sequence import RequestOutput, TokenLogprob
from llmopt.serve import protocol as P

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 2**20
POLL_SECONDS = 0.5  # how often a waiting handler checks for timeout, disconnect and engine death
MAX_FAILED_STEPS = 3  # consecutive failing steps before the engine is declared dead


@dataclass
class ServeConfig:
    model_names: list[str]  # names accepted in the "model" field; the first is the one listed
    api_key: str | None = None
    max_queue: int = 64  # sequences allowed to wait beyond the max_num_seqs running ones
    request_timeout: float = 600.0  # seconds from arrival to the last token
    reasoning_parser: str | None = None  # "think": split <think>...</think> into reasoning_content
    retry_after: int = 1  # seconds, sent with 503 "queue full"


class APIError(Exception):
    """An error answered as an OpenAI error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return P.ErrorResponse(error=P.ErrorInfo(message=self.message, type=self.type, param=self.param,
                                                 code=self.code)).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(APIError):
    """The client went away while its request was waiting (answered 499 to nobody)."""


# ---- engine thread ------------------------------------------------------------------------------

class Job:
    """One HTTP request: ``n`` engine sequences whose outputs arrive on one asyncio queue."""

    def __init__(self, loop: "EngineLoop", request_id: str, n: int):
        self.engine_loop = loop
        self.request_id = request_id
        self.n = n
        self.arrival = time.perf_counter()
        self.aio_loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, RequestOutput | APIError]] = asyncio.Queue()
        self.num_finished = 0
        self.closed = False
        self.request: Request | None = None  # polled for a client disconnect while set
        self.end_reason = "abort"  # why unfinished sequences end if the job closes early

    def engine_id(self, index: int) -> str:
        return f"{self.request_id}-{index}"

    def push(self, index: int, item: RequestOutput | APIError) -> None:
        """Called from the engine thread."""
        try:
            self.aio_loop.call_soon_threadsafe(self.queue.put_nowait, (index, item))
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
            self.engine_loop.abort(self)
            if self.engine_loop.metrics is not None:
                self.engine_loop.metrics.finished.labels(self.end_reason).inc(self.n - self.num_finished)
        self.engine_loop.release(self.n)


class EngineLoop:
    """Runs ``LLMEngine.step`` in one background thread; requests enter through a thread-safe queue."""

    def __init__(self, engine: LLMEngine, max_queue: int):
        self.engine = engine
        self.capacity = engine.config.max_num_seqs + max_queue
        self.inflight = 0  # admitted sequences not yet closed (event-loop thread only)
        self.inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self.jobs: dict[str, tuple[Job, int]] = {}  # engine request id -> (job, index); engine thread only
        self.error: str | None = None  # set when the engine thread died
        self.draining = False  # set on SIGTERM: no new requests
        self.failed_steps = 0
        self.metrics: ServerMetrics | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmopt-engine", daemon=True)

    # -- event-loop side --
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self.inbox.put(("wake",))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def check_alive(self) -> None:
        if self.error is not None or (self._thread.ident is not None and not self._thread.is_alive()):
            raise APIError(503, f"the engine thread died ({self.error or 'exited'}); restart the server",
                           code="engine_dead")

    def admit(self, request_id: str, n: int, retry_after: int) -> Job:
        self.check_alive()
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
        self.inbox.put(("add", job, items))

    def abort(self, job: Job) -> None:
        self.inbox.put(("abort", job))

    def queue_depth(self) -> int:
        return self.inbox.qsize() + len(self.engine.scheduler.waiting)

    # -- engine-thread side --
    def _run(self) -> None:
        import torch

        torch.set_num_threads(self.engine.config.num_threads)  # the intra-op setting is per thread
        try:
            while True:
                idle = not self.engine.has_unfinished()
                if self._stopping.is_set():
                    break
                self._drain(block=idle)
                if not self.engine.has_unfinished():
                    continue
                try:
                    outs = self.engine.step()
                except Exception as e:  # noqa: BLE001 - a failing step must not kill the server
                    self._step_failed(e)
                    continue
                self.failed_steps = 0
                for out in outs:
                    self._deliver(out)
        except BaseException as e:  # noqa: BLE001 - record why, then fail everything fast
            self.error = f"{type(e).__name__}: {e}"
            log.exception("engine thread died")
        finally:
            self._shutdown_jobs()

    def _drain(self, block: bool) -> None:
        try:
            msg = self.inbox.get(timeout=0.1) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(msg)
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            _, job, items = msg
            for i, (ids, params) in enumerate(items):
                eid = job.engine_id(i)
                self.jobs[eid] = (job, i)
                try:
                    self.engine.add_request(ids, params, request_id=eid)
                except Exception as e:  # noqa: BLE001 - a bad request fails alone
                    del self.jobs[eid]
                    job.push(i, APIError(400, str(e), param="prompt"))
        elif kind == "abort":
            job = msg[1]
            for i in range(job.n):
                eid = job.engine_id(i)
                if self.jobs.pop(eid, None) is not None:
                    self.engine.abort(eid)

    def _deliver(self, out: RequestOutput) -> None:
        entry = self.jobs.get(out.request_id)
        if entry is None:  # aborted while the step ran
            return
        job, index = entry
        if out.finished:
            del self.jobs[out.request_id]
        job.push(index, out)

    def _step_failed(self, e: Exception) -> None:
        self.failed_steps += 1
        log.exception("engine step failed (%d in a row)", self.failed_steps)
        sched = self.engine.scheduler
        victims = [s.request_id for s in list(sched.running)] or [s.request_id for s in list(sched.waiting)[:1]]
        for eid in victims:
            self.engine.abort(eid)
            entry = self.jobs.pop(eid, None)
            if entry is not None:
                entry[0].push(entry[1], APIError(500, f"the engine failed while running this request: "
                                                      f"{type(e).__name__}: {e}", code="engine_error"))
        if self.failed_steps >= MAX_FAILED_STEPS:
            raise RuntimeError(f"{self.failed_steps} engine steps failed in a row; last: {type(e).__name__}: {e}")

    def _shutdown_jobs(self) -> None:
        """The thread is ending: nothing may stay waiting on it."""
        if self.error is not None:
            err = APIError(503, f"the engine thread died ({self.error}); restart the server", code="engine_dead")
        else:
            err = APIError(503, "the server shut down before this request finished", code="shutting_down")
        while True:  # requests that never reached the engine
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                break
            if msg[0] == "add":
                for i in range(msg[1].n):
                    msg[1].push(i, err)
        for eid, (job, index) in list(self.jobs.items()):
            try:
                self.engine.abort(eid)
            except Exception:  # noqa: BLE001
                pass
            job.push(index, err)
        self.jobs.clear()


# ---- reasoning split ----------------------------------------------------------------------------

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_reasoning(text: str, in_think: bool = False, final: bool = True) -> tuple[str | None, str]:
    """Split generated text into ``(reasoning, content)`` at ``<think>...</think>``.

    ``in_think``: the prompt already opened the think block (its template ends with ``<think>``).
    With ``final=False`` (streaming) a partial tag at the end is held back, so that successive calls
    on a growing text only ever extend both parts. ``reasoning`` is None when there is no think block.
    """
    s = text
    if not in_think:
        stripped = s.lstrip()
        if stripped.startswith(THINK_OPEN):
            s = stripped[len(THINK_OPEN):]
        elif not final and THINK_OPEN.startswith(stripped):
            return None, ""  # may still become "<think>"
        else:
            return None, text
    end = s.find(THINK_CLOSE)
    if end >= 0:
        return s[:end], s[end + len(THINK_CLOSE):].lstrip("\n")
    if not final:
        for k in range(len(THINK_CLOSE) - 1, 0, -1):
            if s.endswith(THINK_CLOSE[:k]):
                s = s[:-k]
                break
    return s, ""


# ---- metrics ------------------------------------------------------------------------------------

class ServerMetrics:
    """Prometheus metrics in a per-app registry (two apps in one process do not collide)."""

    def __init__(self, engine_loop: EngineLoop):
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("llmopt_requests", "HTTP requests by route and status code", ["route", "code"],
                                registry=r)
        self.finished = Counter("llmopt_request_finish", "Finished sequences by finish reason "
                                "(stop, length, abort, error, timeout)", ["reason"], registry=r)
        lat = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
        self.ttft = Histogram("llmopt_time_to_first_token_seconds", "Arrival to first token", buckets=lat, registry=r)
        self.tpot = Histogram("llmopt_time_per_output_token_seconds", "Mean time per output token after the "
                              "first, per request", buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2,
                                                             2.5, 5), registry=r)
        self.e2e = Histogram("llmopt_e2e_request_latency_seconds", "Arrival to last token", buckets=lat, registry=r)
        el = engine_loop
        eng = el.engine

        class _EngineCollector:
            def collect(self):
                stats = dict(eng.stats)
                for key, help_ in (("prompt_tokens", "Prompt tokens received by the engine"),
                                   ("generated_tokens", "Tokens generated by the engine"),
                                   ("computed_prefill_tokens", "Prompt tokens computed (not served by the "
                                                               "prefix cache)"),
                                   ("steps", "Engine steps")):
                    name = {"generated_tokens": "llmopt_generation_tokens"}.get(key, f"llmopt_{key}")
                    c = CounterMetricFamily(name, help_)
                    c.add_metric([], stats.get(key, 0))
                    yield c
                bm = eng.block_manager
                for name, help_, value in (
                        ("llmopt_num_requests_running", "Sequences in the running batch", len(eng.scheduler.running)),
                        ("llmopt_num_requests_waiting", "Sequences waiting in the scheduler",
                         len(eng.scheduler.waiting)),
                        ("llmopt_queue_depth", "Sequences submitted but not yet running (inbox + scheduler "
                                               "waiting)", el.queue_depth()),
                        ("llmopt_requests_in_flight", "Admitted sequences (running or waiting)", el.inflight),
                        ("llmopt_queue_capacity", "Admission limit: max_num_seqs + max_queue", el.capacity),
                        ("llmopt_kv_blocks_used", "KV cache blocks in use", bm.num_used_blocks),
                        ("llmopt_kv_blocks_total", "KV cache blocks", bm.num_blocks),
                        ("llmopt_engine_alive", "1 while the engine thread runs", int(el.alive))):
                    g = GaugeMetricFamily(name, help_)
                    g.add_metric([], value)
                    yield g

        r.register(_EngineCollector())

    def observe(self, job: Job, out: RequestOutput) -> None:
        self.finished.labels(out.finish_reason or "unknown").inc()
        m = out.metrics
        if m.first_token_time is not None:
            self.ttft.observe(max(0.0, m.first_token_time - job.arrival))
        if out.tpot is not None:
            self.tpot.observe(out.tpot)
        if m.finish_time is not None:
            self.e2e.observe(max(0.0, m.finish_time - job.arrival))


# ---- the server ---------------------------------------------------------------------------------

def _clean_loc(loc: tuple) -> list[str | int]:
    """pydantic error location -> field path (drops union-branch tags such as 'list[str]')."""
    out: list[str | int] = []
    for part in loc:
        if isinstance(part, int):
            out.append(part)
        elif isinstance(part, str) and part.isidentifier() and part not in (
                "str", "int", "float", "bool", "list", "dict", "none"):
            out.append(part)
    return out


_UNION_HINTS = {
    "prompt": "should be a string, an array of strings, an array of token ids or an array of arrays of token ids",
    "stop": f"should be a string or an array of at most {P.MAX_STOP} strings",
    "content": "should be a string or an array of text parts ({\"type\": \"text\", \"text\": ...})",
}


def validation_error(e: ValidationError) -> APIError:
    """The most useful pydantic error as a 400 that names the field (and the value it got)."""
    errors = e.errors()
    if errors and errors[0]["type"] == "json_invalid":
        return APIError(400, f"malformed JSON body: {errors[0]['msg']}", code="invalid_json")
    if errors and errors[0]["type"] == "model_type" and not errors[0]["loc"]:
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    # Prefer errors of the union branch the input matched (constraint failures over type mismatches),
    # then the deepest location.
    def rank(err: dict) -> tuple[int, int]:
        return (0 if err["type"].endswith("_type") else 1, len(err["loc"]))

    best = max(errors, key=rank)
    path = _clean_loc(best["loc"])
    param = ".".join(str(p) for p in path) or None
    branches = {x["loc"] for x in errors if _clean_loc(x["loc"])[:1] == path[:1]}
    last = next((p for p in reversed(path) if isinstance(p, str)), "")
    msg = best["msg"].removeprefix("Value error, ")
    if best["type"] == "extra_forbidden":
        msg = "unrecognized request argument (not part of the OpenAI API or llmopt's extensions)"
    elif best["type"] == "missing":
        msg = "is required"
    elif len(branches) > 1 and best["type"].endswith("_type") and last in _UNION_HINTS:
        path = path[:path.index(last) + 1]  # the hint is about the whole field
        param = ".".join(str(p) for p in path)
        return APIError(400, f"{param}: {_UNION_HINTS[last]}", param=param, code="invalid_value")
    elif path == ["messages"] and best["type"] == "too_short":
        msg = "must contain at least one message"
    got = ""
    if best["type"] not in ("missing", "extra_forbidden"):
        r = json.dumps(best.get("input"), default=str)
        got = f" (got {r[:60] + '...' if len(r) > 60 else r})"
    return APIError(400, f"{param}: {msg}{got}" if param else f"{msg}{got}", param=param,
                    code="invalid_value" if best["type"] != "extra_forbidden" else "unknown_parameter")


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


class OpenAIServer:
    def __init__(self, engine: LLMEngine, config: ServeConfig):
        self.engine = engine
        self.cfg = config
        self.tokenizer = engine.tokenizer
        self.loop = EngineLoop(engine, config.max_queue)
        self.metrics = self.loop.metrics = ServerMetrics(self.loop)
        bm = engine.block_manager
        # a sequence must fit both the context window and the whole KV cache
        self.context_len = min(engine.max_model_len, bm.num_blocks * bm.block_size)
        self._token_str: dict[int, str] = {}

    # -- helpers --
    async def parse(self, request: Request, model: type[BaseModel]) -> Any:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body has {len(body)} bytes; the limit is {MAX_BODY_BYTES}",
                           code="body_too_large")
        if not body.strip():
            raise APIError(400, "the request body is empty: send a JSON object", code="invalid_json")
        try:
            req = model.model_validate_json(body)
        except ValidationError as e:
            raise validation_error(e) from None
        if req.model not in self.cfg.model_names:
            raise APIError(400, f"model {req.model!r} is not served here; this server serves "
                                f"{self.cfg.model_names[0]!r} (see GET /v1/models)", param="model",
                           code="model_not_found")
        return req

    def token_str(self, tid: int) -> str:
        s = self._token_str.get(tid)
        if s is None:
            s = self._token_str[tid] = self.tokenizer.decode([tid], skip_special_tokens=False)
        return s

    def check_length(self, n_prompt: int, max_tokens: int | None, param: str) -> int:
        """-> max_tokens to use (the rest of the context when None); 400 if it cannot fit."""
        ctx = self.context_len
        if n_prompt >= ctx:
            raise APIError(400, f"the prompt has {_tokens(n_prompt)} but the context window of this server fits "
                                f"{ctx} (prompt + at least one new token); shorten the {param}",
                           param=param, code="context_length_exceeded")
        if max_tokens is None:
            return ctx - n_prompt
        if n_prompt + max_tokens > ctx:
            raise APIError(400, f"the prompt has {_tokens(n_prompt)} and max_tokens asks for {max_tokens} more: "
                                f"{n_prompt + max_tokens} do not fit the context window of {ctx}; lower "
                                f"max_tokens to at most {ctx - n_prompt} or shorten the {param}",
                           param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def sampling_params(self, req: P._SamplingFields, max_tokens: int, logprobs: int | None,
                        index: int) -> SamplingParams:
        seed = None if req.seed is None else (req.seed + index) % 2**64  # n > 1: choice i uses seed + i
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k if req.top_k is not None else 0,
                seed=seed, stop=list([req.stop] if isinstance(req.stop, str) else (req.stop or [])),
                stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, logprobs=logprobs,
                skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output)
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split()[0], code="invalid_value") from None

    def encode(self, prompt: str | list[int]) -> list[int]:
        try:
            ids, _ = self.engine.encode_prompt(prompt)
        except (ValueError, TypeError) as e:
            raise APIError(400, f"prompt: {e}", param="prompt", code="invalid_value") from None
        if not ids:
            raise APIError(400, "prompt: is empty (it encodes to no tokens)", param="prompt", code="invalid_value")
        return ids

    async def events(self, job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of ``job`` until all its sequences finish; raises APIError on timeout, engine death,
        an engine-side error, or (while ``job.request`` is set) when the client disconnects."""
        deadline = job.arrival + self.cfg.request_timeout
        last_check = time.perf_counter()
        while not job.done:
            try:
                index, item = await asyncio.wait_for(job.queue.get(), timeout=POLL_SECONDS)
            except asyncio.TimeoutError:
                item = None
            now = time.perf_counter()
            if item is None:
                try:
                    self.loop.check_alive()
                except APIError:
                    job.end_reason = "error"
                    raise
            if job.request is not None and (item is None or now - last_check > POLL_SECONDS):
                last_check = now
                if await job.request.is_disconnected():
                    raise ClientGone(499, "the client disconnected", code="client_disconnected")
            if now > deadline:
                job.end_reason = "timeout"
                raise APIError(504, f"the request timed out after {self.cfg.request_timeout:g} s "
                                    f"(--request-timeout); its sequences were aborted", code="timeout")
            if item is None:
                continue
            if isinstance(item, APIError):
                job.end_reason = "error"
                raise item
            if item.finished:
                job.num_finished += 1
                self.metrics.observe(job, item)
            yield index, item

    # -- routes --
    async def health(self) -> Response:
        if not self.loop.alive and self.loop._thread.ident is not None:
            return JSONResponse({"status": "dead", "error": self.loop.error or "the engine thread exited"},
                                status_code=503)
        if self.loop.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok", "running": len(self.engine.scheduler.running),
                             "waiting": self.loop.queue_depth(), "in_flight": self.loop.inflight,
                             "kv_blocks_used": self.engine.block_manager.num_used_blocks})

    async def metrics_route(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self) -> Response:
        name = self.cfg.model_names[0]
        card = P.ModelCard(id=name, root=str(self.engine.loaded.source), max_model_len=self.context_len)
        return JSONResponse(P.ModelList(data=[card]).model_dump())

    async def completions(self, request: Request) -> Response:
        req: P.CompletionRequest = await self.parse(request, P.CompletionRequest)
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported (no prompt logprobs)", param="echo",
                           code="invalid_value")
        prompts = [self.encode(p) for p in req.prompts()]
        items, prefixes = [], []
        for pi, ids in enumerate(prompts):
            max_tokens = self.check_length(len(ids), req.max_tokens, "prompt")
            echo = "" if not req.echo else (req.prompts()[pi] if isinstance(req.prompts()[pi], str)
                                           else self.tokenizer.decode(ids))
            for j in range(req.n):
                items.append((ids, self.sampling_params(req, max_tokens, req.logprobs, j)))
                prefixes.append(echo)
        rid = f"cmpl-{uuid.uuid4().hex}"
        n_prompt = sum(len(ids) for ids in prompts)
        return await self._run(request, req, rid, items, n_prompt, chat=False, prefixes=prefixes)

    async def chat(self, request: Request) -> Response:
        req: P.ChatCompletionRequest = await self.parse(request, P.ChatCompletionRequest)
        messages = [m.for_template() for m in req.messages]
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - template errors are the caller's input
            raise APIError(400, f"messages: the chat template rejected them: {e}", param="messages",
                           code="invalid_value") from None
        max_tokens = self.check_length(len(ids), req.max_new_tokens, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        items = [(ids, self.sampling_params(req, max_tokens, logprobs, j)) for j in range(req.n)]
        in_think = False
        if self.cfg.reasoning_parser == "think":
            in_think = self.tokenizer.decode(ids[-8:], skip_special_tokens=False).rstrip().endswith(THINK_OPEN)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        return await self._run(request, req, rid, items, len(ids), chat=True, in_think=in_think)

    async def _run(self, request: Request, req: Any, rid: str, items: list, n_prompt: int, chat: bool,
                   prefixes: list[str] | None = None, in_think: bool = False) -> Response:
        job = self.loop.admit(rid, len(items), self.cfg.retry_after)
        job.request = request
        handed_off = False
        try:
            self.loop.submit(job, items)
            stream = self.events(job)
            first = await anext(stream)  # errors before the first token still get a proper status
            fmt = _Formatter(self, req, rid, len(items), n_prompt, chat, prefixes, in_think)
            if req.stream:
                job.request = None  # from here Starlette watches for the disconnect and cancels the body
                body = _sse(fmt, first, stream, job)
                handed_off = True
                return _JobStreamingResponse(body, job, media_type="text/event-stream",
                                             headers={"X-Request-Id": rid, "Cache-Control": "no-cache"})
            fmt.add(*first)
            async for index, out in stream:
                fmt.add(index, out)
            return JSONResponse(fmt.final(), headers={"X-Request-Id": rid})
        finally:
            if not handed_off:
                job.close()


class _JobStreamingResponse(StreamingResponse):
    """Closes its job however the response ends (even if the body iterator never started)."""

    def __init__(self, content: Any, job: Job, **kw: Any):
        super().__init__(content, **kw)
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()


async def _sse(fmt: "_Formatter", first: tuple[int, RequestOutput], rest: AsyncIterator, job: Job
               ) -> AsyncIterator[str]:
    def event(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"

    try:
        for chunk in fmt.start_chunks():
            yield event(chunk)
        for chunk in fmt.chunks(*first):
            yield event(chunk)
        async for index, out in rest:
            for chunk in fmt.chunks(index, out):
                yield event(chunk)
        usage = fmt.usage_chunk()
        if usage is not None:
            yield event(usage)
    except APIError as e:
        yield event(e.body())
    yield "data: [DONE]\n\n"


@dataclass
class _Choice:
    out: RequestOutput | None = None
    sent_text: str = ""
    sent_reasoning: str = ""
    sent_tokens: int = 0
    text_offset: int = 0


class _Formatter:
    """RequestOutputs -> OpenAI responses (whole) or chunks (streaming) for one request."""

    def __init__(self, server: OpenAIServer, req: Any, rid: str, n: int, n_prompt: int, chat: bool,
                 prefixes: list[str] | None, in_think: bool):
        self.s, self.req, self.rid, self.n_prompt, self.chat = server, req, rid, n_prompt, chat
        self.model = req.model
        self.created = int(time.time())
        self.choices = [_Choice() for _ in range(n)]
        self.prefixes = prefixes or [""] * n
        for c, p in zip(self.choices, self.prefixes):
            c.text_offset = len(p)
        self.reasoning = chat and server.cfg.reasoning_parser == "think"
        self.in_think = in_think

    def add(self, index: int, out: RequestOutput) -> None:
        self.choices[index].out = out

    # -- logprobs --
    def _lp_completion(self, c: _Choice, lps: list[TokenLogprob]) -> P.CompletionLogprobs:
        res = P.CompletionLogprobs()
        for lp in lps:
            tok = self.s.token_str(lp.token_id)
            res.tokens.append(tok)
            res.token_logprobs.append(lp.logprob)
            top = {self.s.token_str(t): v for t, v in lp.top}
            top.setdefault(tok, lp.logprob)
            res.top_logprobs.append(top)
            res.text_offset.append(c.text_offset)
            c.text_offset += len(tok)
        return res

    def _lp_chat(self, lps: list[TokenLogprob]) -> P.ChatChoiceLogprobs:
        def entry(tid: int, v: float) -> dict[str, Any]:
            t = self.s.token_str(tid)
            return {"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}

        return P.ChatChoiceLogprobs(content=[P.ChatCompletionTokenLogprob(
            **entry(lp.token_id, lp.logprob), top_logprobs=[P.TopLogprob(**entry(t, v)) for t, v in lp.top])
            for lp in lps])

    def _usage(self) -> P.UsageInfo:
        done = sum(len(c.out.token_ids) for c in self.choices if c.out is not None)
        return P.UsageInfo(prompt_tokens=self.n_prompt, completion_tokens=done, total_tokens=self.n_prompt + done)

    # -- whole response --
    def final(self) -> dict[str, Any]:
        if not self.chat:
            choices = []
            for i, c in enumerate(self.choices):
                o = c.out
                lp = self._lp_completion(c, o.logprobs) if o.logprobs is not None else None
                choices.append(P.CompletionChoice(index=i, text=self.prefixes[i] + o.text, logprobs=lp,
                                                  finish_reason=o.finish_reason))
            return P.CompletionResponse(id=self.rid, created=self.created, model=self.model, choices=choices,
                                        usage=self._usage()).model_dump(exclude_none=False)
        choices = []
        for i, c in enumerate(self.choices):
            o = c.out
            reasoning, content = (split_reasoning(o.text, self.in_think) if self.reasoning else (None, o.text))
            msg = P.ChatMessageOut(content=content, reasoning_content=reasoning)
            lp = self._lp_chat(o.logprobs) if o.logprobs is not None else None
            choices.append(P.ChatCompletionChoice(index=i, message=msg, logprobs=lp, finish_reason=o.finish_reason))
        return P.ChatCompletionResponse(id=self.rid, created=self.created, model=self.model, choices=choices,
                                        usage=self._usage()).model_dump()

    # -- streaming --
    def _chunk(self, choices: list, usage: P.UsageInfo | None = None) -> dict[str, Any]:
        so = self.req.stream_options
        if usage is None and choices and so is not None and so.continuous_usage_stats:
            usage = self._usage()
        cls = P.ChatCompletionStreamResponse if self.chat else P.CompletionStreamResponse
        return cls(id=self.rid, created=self.created, model=self.model, choices=choices, usage=usage).model_dump()

    def start_chunks(self) -> list[dict[str, Any]]:
        if self.chat:
            return [self._chunk([P.ChatCompletionStreamChoice(index=i, delta=P.DeltaMessage(role="assistant",
                                                                                             content=""))])
                    for i in range(len(self.choices))]
        return [self._chunk([P.CompletionChoice(index=i, text=p)]) for i, p in enumerate(self.prefixes) if p]

    def chunks(self, index: int, out: RequestOutput) -> list[dict[str, Any]]:
        c = self.choices[index]
        c.out = out
        text = out.text[:out.released_chars]  # the engine holds back a tail that may become a stop string
        new_lps = out.logprobs[c.sent_tokens:] if out.logprobs is not None else None
        c.sent_tokens = len(out.token_ids)
        finish = out.finish_reason if out.finished else None
        if not self.chat:
            delta = text[len(c.sent_text):]
            c.sent_text = text if len(text) > len(c.sent_text) else c.sent_text
            if not delta and not new_lps and not finish:
                return []
            lp = self._lp_completion(c, new_lps) if new_lps is not None else None
            return [self._chunk([P.CompletionChoice(index=index, text=delta, logprobs=lp, finish_reason=finish)])]
        if self.reasoning:
            reasoning, content = split_reasoning(text, self.in_think, final=out.finished)
        else:
            reasoning, content = None, text
        d_reason = (reasoning or "")[len(c.sent_reasoning):]
        d_content = content[len(c.sent_text):]
        c.sent_reasoning = max(c.sent_reasoning, reasoning or "", key=len)
        c.sent_text = max(c.sent_text, content, key=len)
        if not d_reason and not d_content and not new_lps and not finish:
            return []
        delta = P.DeltaMessage(content=d_content or None, reasoning_content=d_reason or None)
        lp = self._lp_chat(new_lps) if new_lps else None
        choice = P.ChatCompletionStreamChoice(index=index, delta=delta, logprobs=lp, finish_reason=finish)
        return [self._chunk([choice])]

    def usage_chunk(self) -> dict[str, Any] | None:
        so = self.req.stream_options
        if so is None or not so.include_usage:
            return None
        return self._chunk([], usage=self._usage())


# ---- app ----------------------------------------------------------------------------------------

_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


class _Gate:
    """Pure ASGI middleware: the API key on /v1 routes, and request counts by route and status."""

    def __init__(self, app: Any, server: OpenAIServer):
        self.app, self.server = app, server
        key = server.cfg.api_key
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in _ROUTES else "other"
        status = {"code": 500}

        async def counting_send(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            if self.expected is not None and path.startswith("/v1"):
                got = dict(scope.get("headers") or []).get(b"authorization", b"")
                if not secrets.compare_digest(got, self.expected):
                    err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the "
                                        "key given to --api-key", code="invalid_api_key")
                    return await err.response()(scope, receive, counting_send)
            await self.app(scope, receive, counting_send)
        finally:
            self.server.metrics.requests.labels(route, str(status["code"])).inc()


def create_app(engine: LLMEngine, config: ServeConfig) -> FastAPI:
    """The FastAPI app over ``engine``; its lifespan starts and stops the engine thread."""
    from contextlib import asynccontextmanager

    server = OpenAIServer(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop.start()
        log.info("engine thread started; serving %s", config.model_names[0])
        yield
        server.loop.draining = True
        server.loop.stop()
        log.info("engine thread stopped")

    app = FastAPI(title="llmopt OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return APIError(e.status_code, msg, code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal server error: {type(e).__name__}: {e}", code="internal_error").response()

    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics_route, methods=["GET"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.chat, methods=["POST"])
    app.add_middleware(_Gate, server=server)
    return app
