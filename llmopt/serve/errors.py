"""Errors answered as OpenAI error bodies, and the mapping from validation and engine errors to them."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from llmopt.engine.async_engine import EngineDead, EngineError, EngineShutdown, RequestRejected, StepFailed
from llmopt.serve import protocol as P


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


def from_engine_error(e: EngineError) -> APIError:
    """The HTTP answer for a request the engine could not finish."""
    if isinstance(e, RequestRejected):
        return APIError(400, str(e), param="prompt")
    if isinstance(e, StepFailed):
        return APIError(500, str(e), code="engine_error")
    if isinstance(e, EngineDead):
        return APIError(503, str(e), code="engine_dead")
    if isinstance(e, EngineShutdown):
        return APIError(503, str(e), code="shutting_down")
    return APIError(500, str(e), code="engine_error")


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
