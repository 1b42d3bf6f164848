"""A request as the engine sees it: token ids, sampling state, KV block table and timings."""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import torch

from llmopt.engine.sampling_params import SamplingParams
from llmopt.engine.speculative import NgramIndex
from llmopt.models.tokenizer import IncrementalDetokenizer, Tokenizer
from llmopt.reasoning.budget import ReasoningStats, ThinkTracker

if TYPE_CHECKING:
    from llmopt.engine.guided import GuidedState
    from llmopt.engine.kv_policy import KVPolicy


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


class Sequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer,
                 request_id: str | None = None, prompt: str | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.prompt = prompt
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose K/V were computed (logical positions 0..n-1)
        # KV compression (engine/kv_policy.py): rows evicted from the cache (token p lives at row
        # p - num_evicted), whether the end-of-prefill compression ran, the streaming budget in rows
        self.kv_policy: KVPolicy | None = None
        self.num_evicted = 0
        self.kv_compressed = False
        self.kv_budget_rows = 0
        # h2o: attention mass accumulated per (layer, kv head, cache row), float32 [layers, kv_heads, >= kv_len]
        # (columns past kv_len are zero); set when the prefill ends, updated by every later step
        self.kv_scores: torch.Tensor | None = None
        # quest with a pin fraction: the blocks (indices into block_table) each (layer, kv head) always reads,
        # uint8 [layers, kv_heads, prompt blocks], voted at the end of the prefill (kernels/quest.py quest_pins)
        self.quest_pins: torch.Tensor | None = None
        self.kv_rows_at_finish: int | None = None
        self.num_cached_tokens = 0  # of the prompt, how many came from the prefix cache (last admission)
        self.num_hashed_blocks = 0  # leading blocks registered in the prefix cache
        self.block_hashes: list[int] = []
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.metrics = RequestMetrics(arrival_time=time.perf_counter())
        self.generator = torch.Generator().manual_seed(params.seed if params.seed is not None
                                                       else random.getrandbits(63))
        self.detok = IncrementalDetokenizer(tokenizer, self.prompt_ids, params.skip_special_tokens)
        self.text = ""
        self.released_chars = 0  # chars of ``text`` already handed out as ``RequestOutput.delta``
        self.logprobs: list[TokenLogprob] = []
        self.token_times: list[float] = []
        # guided decoding: the grammar state, advanced on every appended token (set by the engine)
        self.guided: GuidedState | None = None
        # efficient reasoning: where the output is in <think>/<answer> (set by the engine); a probe
        # (an internal early-exit trial answer, never returned to users) points at its parent
        self.think = ThinkTracker()
        self.probe_parent: Sequence | None = None
        # speculative decoding (engine/speculative.py): this step's draft tokens (after the last token,
        # computed with it as one chunk; never part of token_ids) and the n-gram index they come from
        self.draft_ids: list[int] = []
        self.draft_match = 0  # length of the n-gram the drafts continue
        self.ngrams: NgramIndex | None = None

    # token ids of prompt + output; the engine computes K/V for these
    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def kv_len(self) -> int:
        """Rows this sequence holds in the KV cache."""
        return self.num_computed_tokens - self.num_evicted

    @property
    def num_to_compute(self) -> int:
        return len(self) + len(self.draft_ids) - self.num_computed_tokens

    def ids_to_compute(self, start: int, n: int) -> list[int]:
        """Token ids of positions ``start..start+n-1``: the sequence's tokens, then its drafts."""
        ids = self.token_ids
        return (ids + self.draft_ids)[start:start + n] if self.draft_ids else ids[start:start + n]

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def paused(self) -> bool:
        """Waiting for its early-exit probe: not scheduled until the probe is done."""
        return self.think.probe is not None

    @property
    def is_probe(self) -> bool:
        return self.probe_parent is not None

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, len={len(self)}, computed={self.num_computed_tokens}, "
                f"status={self.status.value})")


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None
    metrics: RequestMetrics
    num_cached_tokens: int
    delta: str = ""  # text added by the step that produced this output
    token_times: list[float] = field(default_factory=list)
    released_chars: int = 0  # text[:released_chars] is final (a stop string can no longer cut it)
    reasoning: ReasoningStats | None = None  # think / answer tokens, budget and early-exit events
    kv_tokens: int | None = None  # KV cache rows the sequence held when it finished (after compression)

    @classmethod
    def of(cls, seq: Sequence, delta: str = "") -> RequestOutput:
        return cls(seq.request_id, seq.prompt, seq.prompt_ids, seq.text, list(seq.output_ids), seq.finished,
                   seq.finish_reason, list(seq.logprobs) if seq.params.logprobs is not None else None,
                   seq.metrics, seq.num_cached_tokens, delta, list(seq.token_times),
                   len(seq.text) if seq.finished else seq.released_chars, seq.think.stats(len(seq.output_ids)),
                   seq.kv_rows_at_finish if seq.finished else seq.kv_len)

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (seconds)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)
