"""Settings of the OpenAI server (the engine's own settings are ``llmopt.config.EngineConfig``)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_BODY_BYTES = 8 * 2**20
POLL_SECONDS = 0.5  # how often a waiting handler checks for timeout, disconnect and engine death
MAX_FAILED_STEPS = 3  # consecutive failing steps before the engine is declared dead
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass
class ServeConfig:
    model_names: list[str]  # names accepted in the "model" field; the first is the one listed
    api_key: str | None = None
    max_queue: int = 64  # sequences allowed to wait beyond the max_num_seqs running ones
    request_timeout: float = 600.0  # seconds from arrival to the last token
    reasoning_parser: str | None = None  # "think": split <think>...</think> into reasoning_content
    retry_after: int = 1  # seconds, sent with 503 "queue full"
    max_body_bytes: int = MAX_BODY_BYTES  # larger bodies get 413 before (Content-Length) or while read
    body_timeout: float = 30.0  # seconds to receive a whole request body (408 after)
    # Host header names (no port) accepted; None accepts any. A loopback server accepts only its
    # loopback names, so a web page cannot reach it through DNS rebinding.
    allowed_hosts: tuple[str, ...] | None = None
    tokenizer_threads: int = 1  # threads that parse, tokenize and template requests off the event loop
