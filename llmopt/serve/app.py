"""The OpenAI-compatible HTTP server over one ``LLMEngine``: the app factory.

``create_app`` is the one place that assembles the server: routes (``handlers``), the exception
handlers (``errors``) and every middleware. Add middleware here, nowhere else.

The pieces: ``llmopt.engine.async_engine`` steps the engine in a background thread; ``jobs`` admits
HTTP requests onto it (bounded, 503 + Retry-After beyond ``max_num_seqs + max_queue``);
``handlers`` validates, tokenizes and waits for outputs; ``responses`` turns them into OpenAI bodies
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
