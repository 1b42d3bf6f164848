"""Connection-level limits uvicorn does not set by itself, and the uvicorn config that applies them.

- **Header timeout.** uvicorn times out idle keep-alive connections but not a request whose headers
  arrive slowly: a client trickling one header byte every few seconds (slowloris) holds its
  connection forever. ``HeaderTimeoutH11Protocol`` closes a connection whose request line and headers
  are not complete ``header_timeout`` seconds after they started arriving.
- **Header size.** h11 refuses a request line plus headers larger than ``h11_max_incomplete_event_size``
  (16 KiB here) with a 400.
- **Body.** Size (413) and time (408) limits on the body are checked where it is read
  (``handlers.OpenAIServer.read_body``), so a large upload is refused before it is read.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on receiving each request's line and headers."""

    header_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            log.info("closing connection from %s: request headers incomplete after %.0f s",
                     self.client, self.header_timeout)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if idle:
            self._arm()  # bytes of a new request: its headers must be complete in time
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:  # h11 produced a Request: the headers are complete
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def warm_up(engine: Any) -> float:
    """Before the first request: build and load every native kernel and run one two-token request,
    so no compilation or first-call setup lands inside a client's request. Returns the seconds."""
    import time

    from llmopt.engine.sampling_params import SamplingParams
    from llmopt.kernels.build import warm_kernels

    t0 = time.perf_counter()
    warm_kernels()
    engine.generate(["Hello"], SamplingParams(max_tokens=2, temperature=0.0))
    took = time.perf_counter() - t0
    log.info("warm-up: %.2f s", took)
    return took


def uvicorn_config(app: Any, host: str, port: int, header_timeout: float = 10.0, **kwargs: Any) -> uvicorn.Config:
    """A uvicorn config for ``app`` with the connection limits above."""
    protocol = type("HeaderTimeoutH11", (HeaderTimeoutH11Protocol,), {"header_timeout": header_timeout})
    return uvicorn.Config(app, host=host, port=port, http=protocol, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          **kwargs)
