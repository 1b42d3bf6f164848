"""Settings of the OpenAI server (the engine's own settings are ``llmopt.config.EngineConfig``)."""

from __future__ import annotations

from dataclasses import dataclass

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
