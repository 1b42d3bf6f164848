"""The routes of the OpenAI server: validation, admission, and waiting for the engine's outputs."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from llmopt.engine.engine import LLMEngine
from llmopt.engine.guided import GuidedDecodingUnavailable
from llmopt.engine.sampling_params import SamplingParams
from llmopt.engine.sequence import RequestOutput
from llmopt.serve import protocol as P
from llmopt.serve.config import POLL_SECONDS, ServeConfig
from llmopt.serve.errors import APIError, ClientGone, validation_error
from llmopt.serve.jobs import Job, JobQueue
from llmopt.serve.metrics import ServerMetrics
from llmopt.serve.reasoning import THINK_OPEN
from llmopt.serve.responses import Formatter
from llmopt.serve.streaming import JobStreamingResponse, sse

log = logging.getLogger(__name__)

T = TypeVar("T")
_CLOSE = {"Connection": "close"}  # after refusing a body we did not read: the client must stop sending


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


class OpenAIServer:
    def __init__(self, engine: LLMEngine, config: ServeConfig, backend: Any = None):
        self.engine = engine
        self.cfg = config
        self.tokenizer = engine.tokenizer
        self.loop = JobQueue(engine, config.max_queue, backend)
        self.metrics = self.loop.metrics = ServerMetrics(self.loop)
        bm = engine.block_manager
        # a sequence must fit both the context window and the whole KV cache
        self.context_len = min(engine.max_model_len, bm.num_blocks * bm.block_size)
        self._token_str: dict[int, str] = {}
        self.pool = ThreadPoolExecutor(max_workers=config.tokenizer_threads, thread_name_prefix="llmopt-tokenize")

    # -- helpers --
    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-heavy request work (JSON validation, tokenization, chat templates) in the
        tokenizer pool, so the event loop keeps serving /health and streams meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def read_body(self, request: Request) -> bytes:
        """The JSON body, refused before it is read when its type or declared size is wrong, and
        while it is read when it grows past the limit or takes too long."""
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}: send the "
                                f"request as a JSON body", code="unsupported_media_type", headers=_CLOSE)
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise APIError(400, f"Content-Length is not a number: {declared[:40]!r}", code="invalid_request",
                               headers=_CLOSE)
            if int(declared) > limit:
                raise APIError(413, f"the request body has {int(declared)} bytes (Content-Length); the limit is "
                                    f"{limit}", code="body_too_large", headers=_CLOSE)
        body = bytearray()

        async def collect() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limit:
                    raise APIError(413, f"the request body is larger than the limit of {limit} bytes",
                                   code="body_too_large", headers=_CLOSE)

        try:
            await asyncio.wait_for(collect(), self.cfg.body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.cfg.body_timeout:g} s "
                                f"({len(body)} bytes received)", code="body_timeout", headers=_CLOSE) from None
        except ClientDisconnect:
            log.info("client %s disconnected during the upload of %s (%d of %s bytes received)",
                     request.client.host if request.client else "?", request.url.path, len(body),
                     declared or "unknown")
            raise ClientGone(499, "the client disconnected during the upload", code="client_disconnected") from None
        return bytes(body)

    def validate(self, body: bytes, model: type[BaseModel]) -> Any:
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

    async def parse(self, request: Request, model: type[BaseModel]) -> Any:
        body = await self.read_body(request)
        return await self.offload(self.validate, body, model)

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
        guided = self.guided_fields(req)
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k if req.top_k is not None else 0,
                seed=seed, stop=list([req.stop] if isinstance(req.stop, str) else (req.stop or [])),
                stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, logprobs=logprobs,
                skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output, **guided, **req.reasoning_fields())
        except GuidedDecodingUnavailable as e:
            raise APIError(501, f"this server cannot do guided decoding: {e}", param=next(iter(guided)),
                           code="guided_decoding_unavailable") from None
        except ValueError as e:
            param = str(e).split()[0]
            if guided and not req.guided_fields():
                param = "response_format"  # the schema came from response_format
            raise APIError(400, str(e), param=param, code="invalid_value") from None

    @staticmethod
    def guided_fields(req: P._SamplingFields) -> dict[str, Any]:
        """The grammar of a request: its guided_* extension fields or chat's response_format."""
        guided = req.guided_fields()
        fmt = getattr(req, "response_format", None)
        schema = fmt.guided_json() if isinstance(fmt, P.ResponseFormat) else None
        if schema is not None:
            if guided:
                raise APIError(400, f"response_format {fmt.type!r} and {', '.join(guided)} both constrain the "
                                    "output: give one of them", param="response_format", code="invalid_value")
            guided = {"guided_json": schema}
        return guided

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
        refresh = getattr(self.loop.engine, "refresh", None)
        if refresh is not None:
            await refresh()
        if not self.loop.alive and self.loop.engine.started:
            return JSONResponse({"status": "dead", "error": self.loop.error or "the engine thread exited"},
                                status_code=503)
        if self.loop.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok", "running": len(self.loop.engine.running_ids()),
                             "waiting": self.loop.queue_depth(), "in_flight": self.loop.inflight,
                             "kv_blocks_used": self.engine.block_manager.num_used_blocks})

    async def metrics_route(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        refresh = getattr(self.loop.engine, "refresh", None)  # engine replicas: fetch their stats first
        if refresh is not None:
            await refresh()
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
        self.loop.check_admissible(len(req.prompts()) * req.n, "prompt" if len(req.prompts()) > 1 else "n")
        prompts = await self.offload(lambda: [self.encode(p) for p in req.prompts()])
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
        self.loop.check_admissible(req.n, "n")
        ids = await self.offload(self.chat_ids, req)
        max_tokens = self.check_length(len(ids), req.max_new_tokens, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        items = [(ids, self.sampling_params(req, max_tokens, logprobs, j)) for j in range(req.n)]
        in_think = False
        if self.cfg.reasoning_parser == "think":
            in_think = self.tokenizer.decode(ids[-8:], skip_special_tokens=False).rstrip().endswith(THINK_OPEN)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        return await self._run(request, req, rid, items, len(ids), chat=True, in_think=in_think)

    def chat_ids(self, req: P.ChatCompletionRequest) -> list[int]:
        messages = [m.for_template() for m in req.messages]
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt)
        except Exception as e:  # template errors are the caller's input
            raise APIError(400, f"messages: the chat template rejected them: {e}", param="messages",
                           code="invalid_value") from None

    async def _run(self, request: Request, req: Any, rid: str, items: list, n_prompt: int, chat: bool,
                   prefixes: list[str] | None = None, in_think: bool = False) -> Response:
        job = self.loop.admit(rid, len(items), self.cfg.retry_after)
        job.request = request
        handed_off = False
        try:
            self.loop.submit(job, items)
            stream = self.events(job)
            first = await anext(stream)  # errors before the first token still get a proper status
            fmt = Formatter(self, req, rid, len(items), n_prompt, chat, prefixes, in_think)
            if req.stream:
                job.request = None  # from here Starlette watches for the disconnect and cancels the body
                body = sse(fmt, first, stream, job)
                handed_off = True
                return JobStreamingResponse(body, job, media_type="text/event-stream",
                                             headers={"X-Request-Id": rid, "Cache-Control": "no-cache"})
            fmt.add(*first)
            async for index, out in stream:
                fmt.add(index, out)
            return JSONResponse(fmt.final(), headers={"X-Request-Id": rid})
        finally:
            if not handed_off:
                job.close()
