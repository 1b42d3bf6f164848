"""Per-request sampling parameters (the names and meanings of vLLM's ``SamplingParams``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmopt.engine.guided import GuidedSpec


@dataclass
class SamplingParams:
    max_tokens: int = 256  # most new tokens to generate
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0  # nucleus mass, 1 = off
    seed: int | None = None  # per-request RNG seed: same output whatever the batch
    stop: list[str] | str | None = None  # stop strings (not included in the text)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n log-probabilities per generated token (0 = only the chosen one)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # guided decoding (structured outputs, the ``guided`` extra): at most one of these
    guided_regex: str | None = None  # the whole output matches this regex
    guided_json: dict[str, Any] | str | None = None  # the output is JSON valid under this schema
    guided_choice: list[str] | None = None  # the output is exactly one of these strings
    guided_grammar: str | None = None  # the output matches this Lark grammar (llguidance's dialect)
    guided: GuidedSpec | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == -1:
            self.top_k = 0
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (or -1 for off), got {self.top_k!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if any(v is not None for v in (self.guided_regex, self.guided_json, self.guided_choice, self.guided_grammar)):
            from llmopt.engine.guided import GuidedSpec, check_spec

            spec = GuidedSpec.of(self.guided_regex, self.guided_json, self.guided_choice, self.guided_grammar)
            assert spec is not None
            check_spec(spec)  # ValueError naming the problem; GuidedDecodingUnavailable without the extra
            self.guided = spec

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
