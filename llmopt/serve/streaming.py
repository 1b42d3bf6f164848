"""Server-sent events: a streamed response is ``data: <chunk JSON>`` events, then ``data: [DONE]``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi.responses import StreamingResponse

from llmopt.engine.sequence import RequestOutput
from llmopt.serve.errors import APIError
from llmopt.serve.jobs import Job

if TYPE_CHECKING:
    from llmopt.serve.responses import Formatter


class JobStreamingResponse(StreamingResponse):
    """Closes its job however the response ends (even if the body iterator never started)."""

    def __init__(self, content: Any, job: Job, **kw: Any):
        super().__init__(content, **kw)
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()


async def sse(fmt: Formatter, first: tuple[int, RequestOutput], rest: AsyncIterator, job: Job
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
