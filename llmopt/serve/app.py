"""The OpenAI-compatible HTTP server over one ``LLMEngine``: the app factory.

``create_app`` is the one place that assembles the server: routes (``handlers``), the exception
handlers (``errors``) and every middleware. Add middleware here, nowhere else.

The pieces: ``llmopt.engine.async_engine`` steps the engine in a background thread; ``jobs`` admits
HTTP requests onto it (bounded, 503 + Retry-After beyond ``max_num_seqs + max_queue``);
``handlers`` reads bodies (bounded in size and time), validates and tokenizes them in a thread pool
off the event loop, and waits for outputs; ``connections`` sets the uvicorn limits (header timeout
and size); ``responses`` turns them into OpenAI bodies
and chunks; ``streaming`` sends chunks as server-sent events; ``reasoning`` splits ``<think>``;
``metrics`` holds the Prometheus registry; ``errors`` maps every failure to an OpenAI error body.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmopt.engine.engine import LLMEngine
from llmopt.serve.config import ServeConfig
from llmopt.serve.errors import APIError
from llmopt.serve.handlers import OpenAIServer
from llmopt.serve.reasoning import split_reasoning
from llmopt.serve.responses import Formatter

__all__ = ["ServeConfig", "create_app", "split_reasoning", "Formatter", "_Formatter", "OpenAIServer"]

_Formatter = Formatter  # the name tests and older callers import

log = logging.getLogger(__name__)

_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


_OPEN_ROUTES = ("/health", "/metrics")  # answered without the API key


def _host_name(host: bytes) -> str:
    """The name part of a Host header value: 'localhost:8000' -> 'localhost', '[::1]:80' -> '::1'."""
    h = host.decode("latin-1").strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class _Gate:
    """Pure ASGI middleware, first on every request: the Host allowlist (a loopback server answers
    only its loopback names, so a web page cannot reach it by DNS rebinding), the API key on every
    route but /health and /metrics (/openapi.json included), and request counts by route and status."""

    def __init__(self, app: Any, server: OpenAIServer):
        self.app, self.server = app, server
        key = server.cfg.api_key
        self.expected = f"Bearer {key}".encode() if key else None
        hosts = server.cfg.allowed_hosts
        self.hosts = None if hosts is None else {h.strip("[]").lower() for h in hosts}

    def refusal(self, scope: dict) -> APIError | None:
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host")
        if self.hosts is not None and host is not None and _host_name(host) not in self.hosts:
            return APIError(400, f"Host header {host.decode('latin-1')[:100]!r} is not allowed here (this server "
                                 f"answers {', '.join(sorted(self.hosts))}); to reach it under another name, "
                                 f"start it with --allowed-host NAME", code="host_not_allowed")
        if (self.expected is not None and scope.get("path", "") not in _OPEN_ROUTES
                and not secrets.compare_digest(headers.get(b"authorization", b""), self.expected)):
            return APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the "
                                     "key given to --api-key", code="invalid_api_key")
        return None

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
            err = self.refusal(scope)
            if err is not None:
                return await err.response()(scope, receive, counting_send)
            await self.app(scope, receive, counting_send)
        finally:
            self.server.metrics.requests.labels(route, str(status["code"])).inc()


def create_app(engine: LLMEngine, config: ServeConfig, backend: Any = None) -> FastAPI:
    """The FastAPI app over ``engine``; its lifespan starts and stops the engine thread. ``backend``
    replaces that thread (see ``JobQueue``): ``llmopt serve --replicas`` passes a ReplicaSet and,
    as ``engine``, its ReplicaView."""
    from contextlib import asynccontextmanager

    server = OpenAIServer(engine, config, backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop.start()
        log.info("engine thread started; serving %s", config.model_names[0])
        yield
        server.loop.draining = True
        server.loop.stop()
        server.pool.shutdown(wait=False, cancel_futures=True)
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
