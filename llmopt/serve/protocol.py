"""The OpenAI HTTP protocol as pydantic models: requests, responses, stream chunks and errors.

Field names, defaults and response shapes follow the OpenAI API reference (``/v1/completions``,
``/v1/chat/completions``, ``/v1/models``) so the official ``openai`` client works unchanged; a few
vLLM extensions (``top_k``, ``ignore_eos``, ``stop_token_ids``, ``skip_special_tokens``,
``include_stop_str_in_output``, and for guided decoding ``guided_regex``, ``guided_json``,
``guided_choice``, ``guided_grammar``) are accepted as extra body fields; chat also takes OpenAI's
``response_format`` (``json_object``, ``json_schema``). Requests are strict: a wrong
type or an unknown field is a 400 that names the field, as the OpenAI API does.

Range checks live here (``Field(ge=..., le=...)``); checks that need the engine (model name,
prompt length against the context window) live in ``app.py``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 16  # most choices per request
MAX_STOP = 4  # most stop strings per request (the OpenAI limit)
MAX_LOGPROBS = 20


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- shared request pieces ----------------------------------------------------------------------

class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


Stop = str | Annotated[list[str], Field(max_length=MAX_STOP)] | None


class _SamplingFields(_Request):
    """Fields shared by completions and chat completions."""

    model: str
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    stop: Stop = None
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None  # not implemented: only 0
    frequency_penalty: float | None = None  # not implemented: only 0
    logit_bias: dict[str, float] | None = None  # not implemented: only empty
    user: str | None = None
    # vLLM extensions
    top_k: Annotated[int, Field(ge=-1)] | None = None
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM extensions: guided decoding (structured outputs); at most one, checked with the grammar
    guided_regex: str | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None

    # llmopt extensions: efficient reasoning (docs/reasoning.md); values are checked by SamplingParams
    think_budget: int | None = None  # close <think> after this many tokens
    answer_budget: int | None = None  # close <answer> this many tokens after thinking the engine closed
    early_exit: bool = False  # stop thinking when a trial answer at a pause is confident
    early_exit_threshold: float | None = None  # (0, 1]; default: llmopt.reasoning.early_exit.DEFAULT_THRESHOLD
    loop_exit: bool = False  # close <think> when it starts repeating itself
    loop_exit_ngram: int | None = None  # default: llmopt.reasoning.loops.DEFAULT_NGRAM
    loop_exit_repeats: int | None = None  # default: llmopt.reasoning.loops.DEFAULT_REPEATS
    think_budget_threshold: float | None = None  # gate think_budget: cut there only on a confident trial answer
    think_budget_max: int | None = None  # the gated budget's hard cap
    jump_forward: bool = False  # write the rest of a format tag in one step once the model starts it
    low_confidence_exit: float | None = None  # close <think> in place of a think token chosen below this probability
    think_gate: int | None = None  # after this many think tokens, close <think> if the model was unsure of them
    think_gate_threshold: float | None = None  # their geometric-mean probability below which (default 0.86)
    difficulty_exit: float | None = None  # close <think> early when the server's difficulty probe gives P(wrong) above
    difficulty_exit_tokens: int | None = None  # ... at this many think tokens (default 16)
    difficulty_budget: int | None = None  # cap thinking at this many tokens when P(wrong) is above ...
    difficulty_budget_threshold: float | None = None  # ... this (default 0.8)

    def reasoning_fields(self) -> dict[str, Any]:
        """The efficient-reasoning fields that are set, as ``SamplingParams`` keywords."""
        out: dict[str, Any] = {"think_budget": self.think_budget, "answer_budget": self.answer_budget,
                               "early_exit": self.early_exit}
        if self.early_exit_threshold is not None:
            out["early_exit_threshold"] = self.early_exit_threshold
        out["loop_exit"] = self.loop_exit
        out["jump_forward"] = self.jump_forward
        for k in ("loop_exit_ngram", "loop_exit_repeats", "think_budget_threshold", "think_budget_max",
                  "low_confidence_exit", "think_gate", "think_gate_threshold", "difficulty_exit",
                  "difficulty_exit_tokens", "difficulty_budget", "difficulty_budget_threshold"):
            if (v := getattr(self, k)) is not None:
                out[k] = v
        return out

    def guided_fields(self) -> dict[str, Any]:
        """The guided_* fields that are set, as ``SamplingParams`` keywords."""
        return {k: v for k in ("guided_regex", "guided_json", "guided_choice", "guided_grammar")
                if (v := getattr(self, k)) is not None}

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: Stop) -> Stop:
        items = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in items):
            raise ValueError("stop strings must be non-empty")
        return v

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias")
    @classmethod
    def _not_implemented(cls, v: Any) -> Any:
        if v:
            raise ValueError("is not supported by this server (only 0, empty or null)")
        return v


# ---- /v1/completions ----------------------------------------------------------------------------

Prompt = (str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)]
          | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)])


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    best_of: int | None = None  # only best_of == n
    suffix: str | None = None  # not implemented: only "" or null

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("is not supported by this server (only best_of == n)")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("is not supported by this server (only empty or null)")
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: text or token ids, one entry per prompt."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class CompletionLogprobs(_Out):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class UsageInfo(_Out):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponse(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionStreamResponse(CompletionResponse):
    """A stream chunk has the same shape as the full response, with partial text per choice."""


# ---- /v1/chat/completions -----------------------------------------------------------------------

class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextContentPart], Field(min_length=1)] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # echoed back by some clients; dropped from the prompt

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessageIn:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def for_template(self) -> dict[str, str]:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class JsonSchemaFormat(_Request):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's structured outputs: ``text`` (free), ``json_object`` (any JSON object) or
    ``json_schema`` (JSON valid under ``json_schema.schema``), enforced by guided decoding."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError('type "json_schema" needs json_schema.schema (a JSON schema object)')
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f'json_schema is only for type "json_schema", not {self.type!r}')
        return self

    def guided_json(self) -> dict[str, Any] | None:
        """The schema to decode with, or None for free text."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            assert self.json_schema is not None and self.json_schema.schema_ is not None
            return self.json_schema.schema_
        return None


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # deprecated OpenAI name
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None  # not implemented: only empty
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True  # vLLM extension: end the prompt with the assistant header

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list | None) -> list | None:
        if v:
            raise ValueError("tool calling is not supported by this server")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("needs logprobs=true")
        return v

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_max(cls, v: int | None, info: ValidationInfo) -> int | None:
        old = info.data.get("max_tokens")
        if v is not None and old is not None and v != old:
            raise ValueError(f"disagrees with max_tokens={old}: give one of them")
        return v

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatChoiceLogprobs(_Out):
    content: list[ChatCompletionTokenLogprob] | None = None


class ChatMessageOut(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None


class ChatCompletionChoice(_Out):
    index: int
    message: ChatMessageOut
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChatCompletionStreamChoice(_Out):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class ChatCompletionStreamResponse(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# ---- /v1/models and errors ----------------------------------------------------------------------

class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "llmopt"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Out):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Out):
    error: ErrorInfo
