"""AsyncEngine: ``LLMEngine.step`` in one background thread, fed through a thread-safe inbox.

Threads and queues::

    callers (any thread, e.g. an asyncio event loop)        stepping thread (AsyncEngine._run)
      submit(ids, items, sink) / abort(ids)  --inbox (SimpleQueue)-->  add_request / abort
      sink(index, RequestOutput | EngineError)  <-------------------  step() -> RequestOutput

The stepping thread is the only caller of ``add_request``, ``abort`` and ``step``. Each submitted
item is one engine sequence; its outputs (and at most one error) go to the ``sink`` given with it,
called from the stepping thread. A step that raises fails the sequences it was running
(``StepFailed``) and the loop goes on; ``max_failed_steps`` failing steps in a row, or anything
that escapes the loop, kill the thread: ``alive`` turns false, ``error`` says why, and every
waiting or later request gets ``EngineDead`` instead of hanging.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence

from llmopt.engine.engine import LLMEngine
from llmopt.engine.sampling_params import SamplingParams
from llmopt.engine.sequence import RequestOutput

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """A request ended without finishing; the subclass says why."""


class RequestRejected(EngineError):
    """``add_request`` refused the request (bad prompt, too long, ...); it fails alone."""


class StepFailed(EngineError):
    """An engine step raised while this request was running."""


class EngineDead(EngineError):
    """The stepping thread died; restart the engine."""


class EngineShutdown(EngineError):
    """The stepping thread was stopped before the request finished."""


Sink = Callable[[int, "RequestOutput | EngineError"], None]
Item = tuple[list[int], SamplingParams]


class AsyncEngine:
    """Runs ``LLMEngine.step`` in a background thread; requests enter through a thread-safe inbox."""

    def __init__(self, engine: LLMEngine, max_failed_steps: int = 3):
        self.engine = engine
        self.max_failed_steps = max_failed_steps
        self.error: str | None = None  # set when the stepping thread died
        self.failed_steps = 0
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._sinks: dict[str, tuple[Sink, int]] = {}  # engine request id -> (sink, index); thread only
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmopt-engine", daemon=True)

    # ---- any thread -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._inbox.put(("wake",))
        self._thread.join(timeout)

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    @property
    def dead(self) -> bool:
        """The thread was started and is gone (or recorded an error)."""
        return self.error is not None or (self.started and not self._thread.is_alive())

    def submit(self, request_ids: Sequence[str], items: Sequence[Item], sink: Sink) -> None:
        """Queue ``items[i]`` as engine request ``request_ids[i]``; outputs go to ``sink(i, ...)``."""
        if len(request_ids) != len(items):
            raise ValueError(f"{len(request_ids)} request ids for {len(items)} items")
        self._inbox.put(("add", list(request_ids), list(items), sink))

    def abort(self, request_ids: Sequence[str]) -> None:
        self._inbox.put(("abort", list(request_ids)))

    def inbox_size(self) -> int:
        """Submissions (and aborts) not yet taken by the stepping thread."""
        return self._inbox.qsize()

    def running_ids(self) -> list[str]:
        """Request ids in the running batch (taken under the engine lock)."""
        return self.engine.running_ids()

    def num_waiting(self) -> int:
        """Sequences waiting in the scheduler (taken under the engine lock)."""
        return self.engine.num_waiting()

    # ---- stepping thread ------------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        torch.set_num_threads(self.engine.config.threads)  # the intra-op setting is per thread
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
                except Exception as e:  # a failing step must not kill the thread
                    self._step_failed(e)
                    continue
                self.failed_steps = 0
                for out in outs:
                    self._deliver(out)
        except BaseException as e:  # record why, then fail everything fast
            self.error = f"{type(e).__name__}: {e}"
            log.exception("engine thread died")
        finally:
            self._shutdown()

    def _drain(self, block: bool) -> None:
        try:
            msg = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(msg)
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            _, ids, items, sink = msg
            for i, (eid, (prompt, params)) in enumerate(zip(ids, items)):
                self._sinks[eid] = (sink, i)
                try:
                    self.engine.add_request(prompt, params, request_id=eid)
                except Exception as e:  # a bad request fails alone
                    del self._sinks[eid]
                    sink(i, RequestRejected(str(e)))
        elif kind == "abort":
            for eid in msg[1]:
                if self._sinks.pop(eid, None) is not None:
                    self.engine.abort(eid)

    def _deliver(self, out: RequestOutput) -> None:
        entry = self._sinks.get(out.request_id)
        if entry is None:  # aborted while the step ran
            return
        sink, index = entry
        if out.finished:
            del self._sinks[out.request_id]
        sink(index, out)

    def _step_failed(self, e: Exception) -> None:
        self.failed_steps += 1
        log.exception("engine step failed (%d in a row)", self.failed_steps)
        victims = self.engine.running_ids() or self.engine.waiting_ids()[:1]
        for eid in victims:
            self.engine.abort(eid)
            entry = self._sinks.pop(eid, None)
            if entry is not None:
                entry[0](entry[1], StepFailed(f"the engine failed while running this request: "
                                              f"{type(e).__name__}: {e}"))
        if self.failed_steps >= self.max_failed_steps:
            raise RuntimeError(f"{self.failed_steps} engine steps failed in a row; last: {type(e).__name__}: {e}")

    def _shutdown(self) -> None:
        """The thread is ending: nothing may stay waiting on it."""
        err: EngineError
        if self.error is not None:
            err = EngineDead(f"the engine thread died ({self.error}); restart the server")
        else:
            err = EngineShutdown("the server shut down before this request finished")
        while True:  # requests that never reached the engine
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if msg[0] == "add":
                for i in range(len(msg[1])):
                    msg[3](i, err)
        for eid, (sink, index) in list(self._sinks.items()):
            try:
                self.engine.abort(eid)
            except Exception:
                pass
            sink(index, err)
        self._sinks.clear()
