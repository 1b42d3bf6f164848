"""Per-request sampling parameters (the names and meanings of vLLM's ``SamplingParams``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmopt.config import check_kv_policy, check_quest_pin
from llmopt.reasoning.budget import (
    DEFAULT_DIFFICULTY_BUDGET_THRESHOLD,
    DEFAULT_DIFFICULTY_TOKENS,
    DEFAULT_THINK_GATE_THRESHOLD,
    check_answer_budget,
    check_difficulty_budget,
    check_difficulty_exit,
    check_gated_budget,
    check_low_confidence_exit,
    check_think_budget,
    check_think_gate,
)
from llmopt.reasoning.early_exit import (
    DEFAULT_MARKERS,
    DEFAULT_MIN_GAP,
    DEFAULT_PROBE_TOKENS,
    DEFAULT_THRESHOLD,
    EarlyExitConfig,
    check_early_exit,
)
from llmopt.reasoning.loops import DEFAULT_NGRAM, DEFAULT_REPEATS, LoopExitConfig, check_loop_exit

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
    # efficient reasoning (llmopt.reasoning, docs/reasoning.md): close <think> after this many output
    # tokens; and/or try the answer at thinking pauses and stop thinking when it is confident
    think_budget: int | None = None
    # confidence-gated budget: at think_budget try the answer (an early-exit probe with early_exit_min_gap /
    # early_exit_probe_tokens) and close only if its mean token probability is above this threshold; else think
    # on, trying again every early_exit_min_gap tokens, up to think_budget_max (None: where the answer fits)
    think_budget_threshold: float | None = None
    think_budget_max: int | None = None
    # most output tokens after thinking the engine closed (a budget, an exit, the gate; the closing tags
    # included): then the engine writes </answer>. A model that rambles on in its answer after a forced close
    # stops there; an answer after the model's own </think> runs to max_tokens.
    answer_budget: int | None = None
    early_exit: bool = False
    early_exit_threshold: float = DEFAULT_THRESHOLD  # mean token probability of the trial answer, (0, 1]
    early_exit_min_gap: int = DEFAULT_MIN_GAP  # think tokens between probes
    early_exit_probe_tokens: int = DEFAULT_PROBE_TOKENS  # most tokens of a trial answer
    early_exit_markers: tuple[str, ...] = DEFAULT_MARKERS  # where thinking pauses
    # close <think> when its last loop_exit_ngram tokens already occurred loop_exit_repeats times in it
    loop_exit: bool = False
    loop_exit_ngram: int = DEFAULT_NGRAM
    loop_exit_repeats: int = DEFAULT_REPEATS
    # close <think> in place of a think token the model chose with a probability below this (a guess: thinking that
    # has turned into guessing rarely ends right; llmopt.reasoning.budget.doubts); None = off
    low_confidence_exit: float | None = None
    # think gate: after think_gate think tokens, close <think> (in place of the last of them) if their
    # geometric-mean probability is below think_gate_threshold (an unsure start rarely ends right;
    # llmopt.reasoning.budget.ThinkTracker.gate_fails); None = off
    think_gate: int | None = None
    think_gate_threshold: float = DEFAULT_THINK_GATE_THRESHOLD
    # difficulty exit: when the engine's difficulty probe (llmopt.reasoning.difficulty, EngineConfig.difficulty_probe)
    # gives the prompt a P(wrong) above difficulty_exit, close <think> in place of the difficulty_exit_tokens-th think
    # token; None = off
    difficulty_exit: float | None = None
    difficulty_exit_tokens: int = DEFAULT_DIFFICULTY_TOKENS
    # difficulty budget: the same for prompts with P(wrong) above difficulty_budget_threshold, at difficulty_budget
    # think tokens (a second tier, looser or stricter; the smaller cap wins); None = off
    difficulty_budget: int | None = None
    difficulty_budget_threshold: float = DEFAULT_DIFFICULTY_BUDGET_THRESHOLD
    # jump-forward of the think/answer format's scaffolding: once the model writes the first token of <think>,
    # </think>\n<answer> or </answer>, the engine appends the rest in one step (llmopt.reasoning.budget)
    jump_forward: bool = False
    # KV compression for this request (docs/long_context.md): None = the engine's EngineConfig.kv_policy;
    # kv_budget with a policy: fraction of the prompt in (0, 1] or a token count
    kv_policy: str | None = None
    kv_budget: float | int | None = None
    # kv_policy 'quest': the fraction of each step's block budget pinned by the prompt's vote (None: the
    # engine's EngineConfig.kv_quest_pin)
    kv_quest_pin: float | None = None

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
        if self.kv_policy is not None:
            check_kv_policy(self.kv_policy, self.kv_budget)
        elif self.kv_budget is not None:
            raise ValueError("kv_budget needs kv_policy ('streaming', 'snapkv', 'h2o' or 'quest') in the same request")
        if self.kv_quest_pin is not None:
            check_quest_pin(self.kv_quest_pin)
        check_think_budget(self.think_budget)
        check_answer_budget(self.answer_budget)
        check_gated_budget(self.think_budget, self.think_budget_threshold, self.think_budget_max)
        self.early_exit_markers = tuple(self.early_exit_markers)
        check_early_exit(self.early_exit_threshold, self.early_exit_min_gap, self.early_exit_probe_tokens,
                         self.early_exit_markers)
        if not isinstance(self.early_exit, bool):
            raise ValueError(f"early_exit must be true or false, got {self.early_exit!r}")
        if not isinstance(self.loop_exit, bool):
            raise ValueError(f"loop_exit must be true or false, got {self.loop_exit!r}")
        check_loop_exit(self.loop_exit_ngram, self.loop_exit_repeats)
        check_low_confidence_exit(self.low_confidence_exit)
        check_think_gate(self.think_gate, self.think_gate_threshold)
        check_difficulty_exit(self.difficulty_exit, self.difficulty_exit_tokens)
        check_difficulty_budget(self.difficulty_budget, self.difficulty_budget_threshold)
        if not isinstance(self.jump_forward, bool):
            raise ValueError(f"jump_forward must be true or false, got {self.jump_forward!r}")
        if self.guided is not None and self.jump_forward:
            raise ValueError("jump_forward cannot be combined with guided decoding (the grammar decides every token)")
        if self.guided is not None and self.steers_thinking:
            raise ValueError("think_budget, answer_budget, early_exit, loop_exit, low_confidence_exit, think_gate and "
                             "difficulty_exit / difficulty_budget cannot be combined with guided decoding (the engine's forced closing "
                             "text would fight the grammar); cap the think part in the grammar instead")

    @property
    def early_exit_config(self) -> EarlyExitConfig:
        return EarlyExitConfig(self.early_exit_threshold, self.early_exit_min_gap, self.early_exit_probe_tokens,
                               self.early_exit_markers)

    @property
    def loop_exit_config(self) -> LoopExitConfig:
        return LoopExitConfig(self.loop_exit_ngram, self.loop_exit_repeats)

    @property
    def steers_thinking(self) -> bool:
        """The engine may write into this output to keep it in the think/answer format."""
        return (self.think_budget is not None or self.answer_budget is not None or self.early_exit or self.loop_exit
                or self.low_confidence_exit is not None or self.think_gate is not None
                or self.judges_difficulty)

    @property
    def judges_difficulty(self) -> bool:
        """The engine's difficulty probe judges this request's prompt (a difficulty exit or budget)."""
        return self.difficulty_exit is not None or self.difficulty_budget is not None

    @property
    def difficulty_tiers(self) -> tuple[tuple[float | None, int | None], ...]:
        """(P(wrong) threshold, think tokens) of the difficulty exit and budget, for ``difficulty_cap``."""
        return ((self.difficulty_exit, self.difficulty_exit_tokens),
                (self.difficulty_budget_threshold if self.difficulty_budget is not None else None,
                 self.difficulty_budget))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
