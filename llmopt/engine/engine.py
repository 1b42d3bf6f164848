"""LLMEngine: the one generate loop every front end drives.

``add_request`` tokenizes and queues; ``step`` schedules, runs one batched forward, samples, and
post-processes (append, stop strings, EOS, max_tokens, context end, free blocks), returning the
outputs that changed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from llmopt.config import EngineConfig
from llmopt.engine.kv_cache import BlockManager
from llmopt.engine.kv_policy import KVCompressor
from llmopt.engine.runner import ModelRunner
from llmopt.engine.sampler import greedy_rows, needs_chosen_logprob, sample
from llmopt.engine.sampling_params import SamplingParams
from llmopt.engine.scheduler import Scheduler
from llmopt.engine.sequence import RequestOutput, Sequence, TokenLogprob
from llmopt.engine.speculative import AcceptanceStats, NgramIndex, allot
from llmopt.kernels import qlinear
from llmopt.models import gguf_linear as gguf_layers
from llmopt.models.linear import FLOAT, PACKED, QuantConfig
from llmopt.models.loader import load_model
from llmopt.models.registry import default_quant, probe_for
from llmopt.quant.linear import rtn_quant_config
from llmopt.reasoning.budget import (
    ANSWER_CLOSE_TEXT,
    CLOSE_TEXT,
    THINK_END_TEXT,
    THINK_OPEN,
    Phase,
    ThinkTracker,
    answer_limit,
    budget_limit,
    doubts,
    jump_forward_ids,
    prompt_opens_think,
    should_force_answer_close,
)
from llmopt.reasoning.difficulty import DifficultyProbe
from llmopt.reasoning.early_exit import exit_now, should_probe, trial_confidence
from llmopt.reasoning.loops import LoopDetector

if TYPE_CHECKING:
    from llmopt.engine.guided import GuidedDecoder

log = logging.getLogger(__name__)

Prompt = str | list[int] | list[dict[str, str]]  # text, token ids, or chat messages


class PromptTooLongError(ValueError):
    pass


FLOAT_QUANTS = ("fp32", "float", "float32")  # quant names that mean: dequantize, run float


def engine_quant_config(quant: str | None, config: EngineConfig, group_size: int = 64) -> QuantConfig:
    """The linear methods ``LLMEngine`` builds its model with: float projections packed for the
    native fp32 GEMM (``EngineConfig.packed_linear``, float32), or quantized on load to ``quant``
    with the head / tied embedding choices of ``KernelSettings``. (GGUF blocks kept as they are:
    ``load_model(gguf_native=True)`` on top of this config.)"""
    fallback = PACKED if config.packed_linear and config.torch_dtype == torch.float32 else FLOAT
    if quant is None or quant in FLOAT_QUANTS or quant == "gguf":
        return QuantConfig(default=fallback)
    if quant.upper() in gguf_layers.GGUF_QUANTIZE_TYPES:  # blocks of a GGUF type, on the GGUF kernels
        method = gguf_layers.GGUFQuantizeMethod(quant, config.kernel_settings.gguf_act, fallback)
        return QuantConfig(default=method, lm_head=method)
    ks = config.kernel_settings
    return rtn_quant_config(quant, group_size, quantize_lm_head=ks.quant_lm_head, lm_head_fmt=ks.lm_head_fmt,
                            quantize_embedding=ks.quant_embed, fallback=fallback)


class LLMEngine:
    def __init__(self, model: str, config: EngineConfig | None = None, quant: str | None = None,
                 group_size: int = 64, adapter: str | None = None):
        """``quant``: None = the model as stored (a GGUF file runs on its own quantized blocks, other
        sources in float) or, for a registry name that sets one, its own format (``RegistryEntry.quant``);
        "gguf" = a GGUF file's own blocks, required to be a GGUF file; "fp32" = float (a GGUF file
        dequantized, as before GGUF-native); q8_0 / q5_1 / q5_0 / q4_1 / q4_0 = quantized on load into
        that GGUF type's blocks (GGUF kernels); another format name (int8, int4, ...) = quantized on load
        (round-to-nearest) from the float weights. ``adapter``: a LoRA adapter file merged at load
        (in fp32) instead of the registry name's own."""
        self.config = cfg = config or EngineConfig()
        if quant is None:  # a registry entry's own format (the reasoning model: q8_0)
            quant = default_quant(model)
        torch.set_num_threads(cfg.threads)
        ks = cfg.kernel_settings
        qlinear.configure(int4_act=ks.int4_act, int4_a8_max_m=ks.int4_a8_max_m, large_m=ks.large_m,
                          tiles=ks.decode_tiles)
        gguf_layers.configure(bf16x3=ks.gguf_bf16x3, prompt_int16=ks.gguf_prompt_int16)
        self.quant = quant
        self.quant_config = engine_quant_config(quant, cfg, group_size)
        self.loaded = load_model(model, dtype=cfg.torch_dtype, max_positions=cfg.max_model_len or 8192,
                                 quant_config=self.quant_config, gguf_native=quant in (None, "gguf"),
                                 gguf_act=ks.gguf_act, adapter=adapter)
        if quant == "gguf" and self.loaded.source.suffix != ".gguf":
            raise ValueError(f"quant='gguf' runs a GGUF file's own blocks, and {model!r} is not a .gguf file; "
                             "leave quant unset or choose a format (int8, int4, ...)")
        self.model, self.tokenizer, self.model_config = self.loaded.model, self.loaded.tokenizer, self.loaded.config
        self.max_model_len = self.model.max_positions
        from llmopt.kernels.dense import PackedLinear

        self.packed_linears = sum(isinstance(m, PackedLinear) for m in self.model.modules())
        quest = cfg.kv_policy == "quest"  # keep the Quest key summaries (engine/kv_policy.py)
        per_block = ModelRunner.kv_bytes_per_block(self.model, cfg.block_size, cfg.torch_kv_dtype, quest)
        num_blocks = cfg.num_kv_blocks or max(1, int(cfg.kv_cache_memory_gb * 2**30 // per_block))
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(cfg, self.block_manager)
        self.runner = ModelRunner(self.model, num_blocks, cfg.block_size, cfg.torch_kv_dtype,
                                  fused_decode=ks.fused_decode,
                                  quest_dense_layers=cfg.kv_quest_dense_layers if quest else None)
        self.compressor = KVCompressor(self.runner.cache_tensors, self.block_manager, cfg.block_size)
        if cfg.kv_policy != "full":
            self._check_compressible()
        # one sequence must fit the KV cache as well as the rope table
        self.max_model_len = min(self.max_model_len, num_blocks * cfg.block_size)
        self.lock = threading.RLock()  # add/abort may come from other threads than step()
        self._guided: GuidedDecoder | None = None  # built on the first guided request
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "computed_prefill_tokens": 0, "steps": 0,
                      "probes": 0, "early_exits": 0, "low_confidence_exits": 0, "think_gate_exits": 0,
                      "budget_probe_exits": 0, "difficulty_exits": 0, "jump_forward_tokens": 0, "probe_generated_tokens": 0, "probe_prompt_tokens": 0,
                      "probe_cached_tokens": 0, "spec_steps": 0, "spec_draft_tokens": 0, "spec_accepted_tokens": 0}
        self.spec_stats = AcceptanceStats(cfg.prompt_lookup_max, cfg.num_speculative_tokens)
        # what the engine writes to close a think part / an answer (think budgets, early exit)
        self.close_ids = self.tokenizer.encode(CLOSE_TEXT, add_special_tokens=False)
        self.answer_close_ids = self.tokenizer.encode(ANSWER_CLOSE_TEXT, add_special_tokens=False)
        self.open_ids = self.tokenizer.encode(THINK_OPEN, add_special_tokens=False)  # jump-forward
        self.think_end_ids = self.tokenizer.encode(THINK_END_TEXT, add_special_tokens=False)
        self.difficulty_probe = self._load_probe(model, cfg.difficulty_probe, adapter is None)
        log.info("engine: %d KV blocks x %d tokens, max_model_len %d, %d threads, linears %s (%d packed fp32)",
                 num_blocks, cfg.block_size, self.max_model_len, cfg.num_threads,
                 self.model.quant_config.describe(), self.packed_linears)

    def _load_probe(self, model: str, path: str | None, own_weights: bool) -> DifficultyProbe | None:
        """The difficulty probe for ``difficulty_exit`` requests: ``path``, else the registry model's own (when
        ``own_weights``: no other adapter merged), else None; a probe for another hidden size is refused."""
        source = path if path is not None else probe_for(model) if own_weights else None
        if source is None:
            return None
        probe = DifficultyProbe.load(source)
        if probe.hidden_size != self.model_config.hidden_size:
            raise ValueError(f"difficulty probe {str(source)!r} reads hidden states of size {probe.hidden_size} "
                             f"(trained on {probe.meta.get('model', 'another model')!r}); {model!r} has "
                             f"{self.model_config.hidden_size}: train one for it with `llmopt train probe`")
        return probe

    def prompt_states(self, prompts: list[list[int]]) -> torch.Tensor:
        """Final-norm hidden state at each prompt's last token, float32 [len(prompts), hidden]: what the
        difficulty probe reads (one causal pass per prompt, no cache)."""
        out = []
        for ids in prompts:
            if not ids or len(ids) > self.max_model_len:
                raise ValueError(f"a prompt of {len(ids)} tokens has no state here (1..{self.max_model_len} tokens)")
            with torch.inference_mode():
                h = self.model(torch.tensor(ids, dtype=torch.long), torch.arange(len(ids)), None)
            out.append(h[-1].float())
        return torch.stack(out) if out else torch.zeros(0, self.model_config.hidden_size)

    def kv_info(self) -> dict[str, Any]:
        """The KV cache as configured: element type, bytes per cached token (K and V of every layer,
        scales included), blocks, and the compression policy."""
        cfg = self.config
        return {"dtype": str(self.runner.k_cache.dtype).removeprefix("torch."),
                "scales": "float32 per token and kv head" if self.runner.k_scale is not None else None,
                "bytes_per_token": self.runner.kv_bytes_per_token,
                "blocks": self.block_manager.num_blocks, "block_size": cfg.block_size,
                "policy": cfg.kv_policy, "budget": cfg.kv_budget}

    def _check_compressible(self) -> None:
        if any(w is not None for w in self.model_config.layer_windows):
            raise ValueError("KV compression (kv_policy streaming/snapkv/h2o/quest) needs full-attention layers: this model has "
                             "sliding-window layers; use kv_policy='full'")

    # ---- requests -------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt), prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            return self.tokenizer.apply_chat_template(prompt), None
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = [t for t in prompt if isinstance(t, int)]
            bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.model_config.vocab_size - 1})")
            return ids, None
        raise TypeError("a prompt is a string, a list of token ids, or a list of chat messages")

    def guided_decoder(self) -> GuidedDecoder:
        """The grammar side for this engine's tokenizer (built once, on the first guided request)."""
        if self._guided is None:
            from llmopt.engine.guided import GuidedDecoder

            t0 = time.perf_counter()
            self._guided = GuidedDecoder(self.tokenizer, self.model_config.vocab_size)
            log.info("guided decoding: tokenizer index built in %.2fs", time.perf_counter() - t0)
        return self._guided

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        params = params or SamplingParams()
        ids, text = self.encode_prompt(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(f"the prompt has {len(ids)} tokens but the context window fits "
                                     f"{self.max_model_len} (prompt + at least one new token); shorten it")
        seq = Sequence(ids, params, self.tokenizer, request_id, text)
        seq.kv_policy = self.config.kv_policy_for(params.kv_policy, params.kv_budget, params.kv_quest_pin)
        if seq.kv_policy is not None and params.kv_policy is not None:
            self._check_compressible()
        if seq.kv_policy is not None and seq.kv_policy.name == "quest" and self.runner.k_min is None:
            raise ValueError("kv_policy 'quest' per request needs an engine built with EngineConfig(kv_policy='quest') "
                             "(it keeps per-block key summaries next to the cache); requests there may still ask "
                             "for kv_policy='full'")
        if params.judges_difficulty and self.difficulty_probe is None:
            raise ValueError("difficulty_exit and difficulty_budget need a difficulty probe for this model: train one with `llmopt train "
                             "probe --model MODEL --out FILE` and load it with EngineConfig(difficulty_probe=FILE) "
                             "(--difficulty-probe FILE)")
        seq.think = ThinkTracker(opened_in_prompt=prompt_opens_think(self.tokenizer.decode(ids[-8:])))
        if params.guided is not None:
            with self.lock:  # the decoder's cache is shared with step()
                seq.guided = self.guided_decoder().start(params.guided)
        with self.lock:
            self.scheduler.add(seq)
            self.stats["prompt_tokens"] += len(ids)
        return seq

    def abort(self, request_id: str) -> bool:
        with self.lock:
            return self.scheduler.abort(request_id) is not None

    def reset_prefix_cache(self) -> int:
        """Drop the prefix cache: call it after changing the model's weights (the cached blocks hold
        K/V of the old weights). Returns how many cached blocks were forgotten."""
        with self.lock:
            return self.block_manager.reset_prefix_cache()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def running_ids(self) -> list[str]:
        """Request ids of the sequences in the running batch (a snapshot taken under the lock)."""
        with self.lock:
            return [s.request_id for s in self.scheduler.running if not s.is_probe]

    def waiting_ids(self) -> list[str]:
        """Request ids of the sequences waiting to be scheduled, oldest first (under the lock)."""
        with self.lock:
            return [s.request_id for s in self.scheduler.waiting if not s.is_probe]

    def num_waiting(self) -> int:
        """Sequences waiting in the scheduler (under the lock)."""
        with self.lock:
            return sum(1 for s in self.scheduler.waiting if not s.is_probe)

    # ---- the loop -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if torch.get_num_threads() != self.config.num_threads:  # the setting is per thread
            torch.set_num_threads(self.config.threads)
        with self.lock:
            drafted = self._draft() if self.config.speculative else []
            batch = self.scheduler.schedule()
            if drafted:
                self._fit_drafts(drafted, batch)
        if not batch:
            return []
        seqs, logits = self.runner.execute(batch)
        now = time.perf_counter()
        outputs: list[RequestOutput] = []
        with self.lock:
            self.stats["steps"] += 1
            for seq, n in batch:
                p0 = seq.num_computed_tokens
                self.stats["computed_prefill_tokens"] += max(0, min(p0 + n, len(seq.prompt_ids)) - p0)
                seq.num_computed_tokens += n
                if not seq.draft_ids:  # with drafts: once the kept ones are known (_verify)
                    self.block_manager.register_computed(seq)
                if seq.kv_policy is not None:
                    self.compressor.after_step(seq, self.runner.observed.get(seq.seq_id))
            if logits is None:
                return []
            self._judge_prompts(seqs)
            if drafted:  # rows of sequences with drafts: verified here, the rest sampled below
                spec = [i for i, s in enumerate(seqs) if s.draft_ids]
                if spec:
                    top, best = greedy_rows(logits[spec])
                    greedy = best.tolist()
                    # the greedy token's log-probability, for a low-confidence exit or a think gate (else unused: 0)
                    if any(needs_chosen_logprob(seqs[i]) for i in spec):
                        chosen = (top - torch.logsumexp(logits[spec], -1)).tolist()
                    else:
                        chosen = [0.0] * len(spec)
                    rows: dict[int, list[tuple[int, float]]] = {}
                    for i, tok, lp in zip(spec, greedy, chosen):
                        rows.setdefault(seqs[i].seq_id, []).append((tok, lp))
                    for seq in dict.fromkeys(seqs[i] for i in spec):
                        outputs.append(RequestOutput.of(seq, self._verify(seq, rows[seq.seq_id], now)))
                    verified = set(spec)
                    keep = [i for i in range(len(seqs)) if i not in verified]
                    seqs, logits = [seqs[i] for i in keep], logits[keep]
                    if not seqs:
                        return outputs
            tokens, lps = sample(logits, seqs, self._guided)
            for seq, tok, lp in zip(seqs, tokens, lps):
                if seq.finished:  # aborted while the step ran
                    continue
                chars = len(seq.text)
                if self._eos_breaks_format(seq, tok):  # a budgeted output keeps the format: close instead
                    delta = self._close_on_eos(seq, now)
                    outputs.append(RequestOutput.of(seq, delta))
                    continue
                if seq.params.steers_thinking and (by := self._doubt(seq, None if lp is None else lp.logprob)):
                    outputs.append(RequestOutput.of(seq, self._close_in_doubt(seq, now, by)))
                    continue
                delta = self._append(seq, tok, lp if seq.params.logprobs is not None else None, now)
                if seq.is_probe:  # internal: no output; a finished probe may end its parent's thinking
                    parent = self._probe_done(seq, now) if seq.finished else None
                    if parent is not None:
                        outputs.append(RequestOutput.of(parent, self._release_text(parent)))
                    continue
                delta += self._steer(seq, len(seq.text) - chars, now)
                outputs.append(RequestOutput.of(seq, delta))
        return outputs

    # ---- speculative decoding: n-gram drafts verified in the step (engine/speculative.py) --------
    def _speculates(self, seq: Sequence) -> bool:
        """Whether a running, unpaused sequence may draft this step."""
        p = seq.params
        return (p.greedy and seq.guided is None and p.logprobs is None and seq.kv_policy is None
                and not seq.is_probe and seq.num_to_compute == 1)

    def _draft(self) -> list[Sequence]:
        """Give running greedy sequences their draft tokens for the next step (``Sequence.draft_ids``),
        within ``spec_max_rows`` rows for the step. Returns the sequences that got drafts."""
        cfg = self.config
        running = [s for s in self.scheduler.running if not s.paused]
        if len(running) > cfg.spec_max_batch:
            return []
        cands, wants = [], []
        for seq in running:
            if not self._speculates(seq):
                continue
            k = min(cfg.num_speculative_tokens, seq.params.max_tokens - len(seq.output_ids) - 1,
                    self.max_model_len - len(seq) - 1)
            if k <= 0:
                continue
            if seq.ngrams is None:
                seq.ngrams = NgramIndex(cfg.prompt_lookup_min, cfg.prompt_lookup_max)
            ids, n = seq.ngrams.propose(seq.token_ids, k)
            if ids:
                cands.append(seq)
                wants.append((n, ids))
        chances = [self.spec_stats.chances(n, len(ids)) for n, ids in wants]
        takes = allot(chances, cfg.spec_max_rows, len(running), cfg.spec_row_cost, cfg.spec_tile_cost,
                      cfg.spec_tile_rows)
        for seq, (n, ids), t in zip(cands, wants, takes):
            seq.draft_ids, seq.draft_match = ids[:t], n
        return [s for s in cands if s.draft_ids]

    def _fit_drafts(self, drafted: list[Sequence], batch: list[tuple[Sequence, int]]) -> None:
        """Cut each drafted sequence's drafts to what the scheduler gave it (the token budget may
        leave out some; a preempted or unscheduled sequence keeps none)."""
        given = {s.seq_id: n for s, n in batch}
        for seq in drafted:
            n = given.get(seq.seq_id, 0)
            seq.draft_ids = seq.draft_ids[:max(0, n - 1)]
            if seq.draft_ids:
                self.stats["spec_draft_tokens"] += len(seq.draft_ids)

    def _verify(self, seq: Sequence, greedy: list[tuple[int, float]], now: float) -> str:
        """Take the model's greedy tokens (with their log-probabilities) of a chunk with drafts: row i's
        token is appended (and steered, as any sampled token) while the drafts before it matched the
        model's choices; the first mismatch, a finished sequence or engine-written tokens end it. The
        sequence's computed length then covers the rows whose input tokens were kept."""
        drafts, seq.draft_ids = seq.draft_ids, []
        base = seq.num_computed_tokens - len(greedy)
        if seq.finished:  # aborted while the step ran
            return ""
        delta, used, mismatched = "", 0, False
        for i, (tok, lp) in enumerate(greedy):
            used += 1
            n_out, chars = len(seq.output_ids), len(seq.text)
            if self._eos_breaks_format(seq, tok):
                delta += self._close_on_eos(seq, now)
                break
            if by := self._doubt(seq, lp):
                delta += self._close_in_doubt(seq, now, by)
                break
            delta += self._append(seq, tok, None, now)
            delta += self._steer(seq, len(seq.text) - chars, now)
            if seq.finished or seq.paused or len(seq.output_ids) != n_out + 1 or i >= len(drafts):
                break
            if tok != drafts[i]:
                mismatched = True
                break
        self.spec_stats.record(seq.draft_match, len(drafts), used - 1, mismatched)
        self.stats["spec_accepted_tokens"] += used - 1
        self.stats["spec_steps"] += 1
        if not seq.finished:
            seq.num_computed_tokens = base + used
            self.block_manager.register_computed(seq)
        return delta

    # ---- efficient reasoning: think budgets and early-exit probes (llmopt.reasoning) -------------
    def _steer(self, seq: Sequence, new_chars: int, now: float) -> str:
        """After a sampled token: close thinking at the budget, fork an early-exit probe at a pause,
        or close an answer that max_tokens is about to cut. Returns the text that became final."""
        t, p, n = seq.think, seq.params, len(seq.output_ids)
        if seq.finished:
            return ""
        if p.jump_forward:
            ids = jump_forward_ids(t, seq.output_ids, self.open_ids, self.think_end_ids, self.answer_close_ids)
            if ids:
                self.stats["jump_forward_tokens"] += len(ids)
                return self._force(seq, ids, now)
        if t.phase == Phase.THINKING:
            # loop exit keeps the format too: without a budget, thinking is closed where the answer still fits
            budget = p.think_budget if p.think_budget is not None else (p.max_tokens if p.loop_exit else None)
            limit = budget_limit(budget, p.max_tokens, len(self.close_ids))
            gated = limit is not None and n >= limit and p.think_budget_threshold is not None
            if gated:  # a confidence-gated budget: cut at the budget only on a confident trial answer
                cap = budget_limit(p.think_budget_max or p.max_tokens, p.max_tokens, len(self.close_ids))
                gated = cap is not None and n < cap
            if limit is not None and n >= limit and not gated:
                t.close(n, "budget")
                return self._force(seq, self.close_ids, now)
            if p.loop_exit and self._looping(seq):
                t.close(n, "loop")
                return self._force(seq, self.close_ids, now)
            if gated and t.probe is None and (t.budget_probes == 0
                                              or n - t.last_probe_at >= p.early_exit_min_gap):
                self._fork_probe(seq, for_budget=True)
            elif p.early_exit and should_probe(t, n, seq.text, new_chars, p.early_exit_config):
                self._fork_probe(seq)
        elif p.steers_thinking and should_force_answer_close(t, n, answer_limit(t, p.max_tokens, p.answer_budget),
                                                             len(self.answer_close_ids)):
            return self._end_answer(seq, now)
        return ""

    @staticmethod
    def _looping(seq: Sequence) -> bool:
        """Feed the think tokens sampled since the last call to the sequence's loop detector (O(1) per
        token); True when the think part has started repeating itself."""
        t = seq.think
        if t.loop is None:
            t.loop = LoopDetector(seq.params.loop_exit_config)
        fired = False
        for tok in seq.output_ids[t.loop.tokens:]:
            fired = t.loop.add(tok) or fired
        return fired

    def _eos_breaks_format(self, seq: Sequence, token: int) -> bool:
        p, t = seq.params, seq.think
        return (p.steers_thinking and t.phase in (Phase.THINKING, Phase.ANSWER)
                and not t.answer_closed and not p.ignore_eos
                and (token in p.stop_token_ids or token in self.tokenizer.stop_token_ids))

    def _close_on_eos(self, seq: Sequence, now: float) -> str:
        """The model ended a budgeted output inside <think> or <answer>: in place of the
        end-of-sequence token the engine writes the closing text (``</think>\n<answer>\n``: the
        model then answers) or ``</answer>`` (the sequence ends)."""
        t = seq.think
        if t.phase == Phase.THINKING:
            t.close(len(seq.output_ids), "eos")
            return self._force(seq, self.close_ids, now)
        return self._end_answer(seq, now)

    def _judge_prompts(self, seqs: list[Sequence]) -> None:
        """Difficulty exit: P(wrong) of each sequence sampled for the first time this step (its prompt's last
        row is in the runner's sampled hidden states), for requests that ask for it."""
        rows = [i for i, s in enumerate(seqs) if s.params.judges_difficulty and s.think.p_wrong is None
                and not s.output_ids and not s.draft_ids]
        hidden = self.runner.sampled_hidden
        if not rows or hidden is None or self.difficulty_probe is None:
            return
        for i, p in zip(rows, self.difficulty_probe.p_wrong(hidden[rows]).tolist()):
            seqs[i].think.p_wrong = p

    @staticmethod
    def _doubt(seq: Sequence, logprob: float | None) -> str | None:
        """Whether the think token the model just chose (not yet appended; ``logprob`` its log-probability,
        given whenever a low-confidence exit or an open think gate needs it) ends its thinking: "low_confidence" (a
        guess, ``doubts``), "think_gate" (an unsure start, ``ThinkTracker.gate_fails``, which also counts the
        token), "difficulty" (a prompt the difficulty probe judged hard, at its token count,
        ``ThinkTracker.difficulty_fails``), else None."""
        p, t = seq.params, seq.think
        if logprob is not None and doubts(t, logprob, p.low_confidence_exit):
            return "low_confidence"
        if logprob is not None and t.gate_fails(logprob, p.think_gate, p.think_gate_threshold):
            return "think_gate"
        if t.p_wrong is not None and t.difficulty_fails(p.difficulty_tiers):
            return "difficulty"
        return None

    def _close_in_doubt(self, seq: Sequence, now: float, by: str) -> str:
        """Low-confidence exit, think gate or difficulty exit (``by``, from ``_doubt``): in place of the token the model
        chose the engine writes the closing text and the model answers from what it has."""
        seq.think.close(len(seq.output_ids), by)
        self.stats[f"{by}_exits"] += 1
        return self._force(seq, self.close_ids, now)

    def _end_answer(self, seq: Sequence, now: float) -> str:
        """Write ``</answer>`` and end the sequence (at its answer budget, max_tokens or an EOS)."""
        delta = self._force(seq, self.answer_close_ids, now)
        if not seq.finished:
            self.scheduler.finish(seq, "stop")
            delta += self._release_text(seq)
        return delta

    def _force(self, seq: Sequence, ids: list[int], now: float, lps: list[TokenLogprob] | None = None) -> str:
        """Append tokens the engine chose (computed by the next step as one chunk, like a prefill)."""
        delta = ""
        for i, tok in enumerate(ids):
            if seq.finished:
                break
            lp = lps[i] if lps is not None else (TokenLogprob(tok, 0.0, []) if seq.params.logprobs is not None
                                                  else None)
            delta += self._append(seq, tok, lp, now)
            seq.think.forced_tokens += 1
        return delta

    def _fork_probe(self, parent: Sequence, for_budget: bool = False) -> None:
        """Queue a greedy trial answer on the parent's tokens + the closing text; the parent waits.
        ``for_budget``: tried at a confidence-gated think budget (its threshold decides), not at a pause."""
        t, p = parent.think, parent.params
        cfg = p.early_exit_config
        ids = parent.token_ids + self.close_ids
        room = p.max_tokens - len(parent.output_ids) - len(self.close_ids)
        if len(ids) + cfg.probe_tokens > self.max_model_len or room < cfg.probe_tokens:
            return  # an adopted trial answer would not fit: no probe
        t.probes += 1
        t.budget_probes += for_budget
        t.last_probe_at = len(parent.output_ids)
        params = SamplingParams(max_tokens=cfg.probe_tokens, temperature=0.0, stop=[ANSWER_CLOSE_TEXT],
                                include_stop_str_in_output=True, logprobs=0,
                                skip_special_tokens=p.skip_special_tokens)
        probe = Sequence(ids, params, self.tokenizer, f"{parent.request_id}#probe{t.probes}")
        probe.probe_parent = parent
        self.scheduler.add_probe(probe)
        t.probe_for_budget = for_budget
        self.stats["probes"] += 1

    def _probe_done(self, probe: Sequence, now: float) -> Sequence | None:
        """Score a finished probe; on a confident trial answer the parent adopts it (and is returned)."""
        parent = probe.probe_parent
        assert parent is not None
        t = parent.think
        t.probe = None
        t.probe_prompt_tokens += len(probe.prompt_ids)
        t.probe_cached_tokens += probe.num_cached_tokens
        t.probe_tokens += len(probe.prompt_ids) - probe.num_cached_tokens + len(probe.output_ids)
        self.stats["probe_prompt_tokens"] += len(probe.prompt_ids)
        self.stats["probe_cached_tokens"] += probe.num_cached_tokens
        self.stats["probe_generated_tokens"] += len(probe.output_ids)
        if parent.finished:
            return None
        ids, lps = list(probe.output_ids), list(probe.logprobs)
        if ids and ids[-1] in self.tokenizer.stop_token_ids:  # the trial answer ended with EOS: close it
            ids, lps = ids[:-1] + self.answer_close_ids, lps[:-1] + [TokenLogprob(x, 0.0, []) for x in self.answer_close_ids]
        pieces = [self.tokenizer.decode([tok]) for tok in ids]
        conf = trial_confidence([lp.logprob for lp in lps], pieces)
        t.confidences.append(-1.0 if conf is None else round(conf, 6))
        p = parent.params
        threshold = p.think_budget_threshold if t.probe_for_budget else p.early_exit_threshold
        if threshold is None or not exit_now(conf, threshold):
            return None
        self.stats["budget_probe_exits" if t.probe_for_budget else "early_exits"] += 1
        n = len(parent.output_ids)
        t.close(n, "budget_probe" if t.probe_for_budget else "early_exit")
        t.exit_at = n
        forced = [TokenLogprob(tok, 0.0, []) for tok in self.close_ids] + lps
        if parent.params.logprobs:  # the probe kept only the chosen token's logprob
            forced = [TokenLogprob(x.token_id, x.logprob, [(x.token_id, x.logprob)]) for x in forced]
        self._force(parent, self.close_ids + ids, now,
                    forced if parent.params.logprobs is not None else None)
        return parent

    def _append(self, seq: Sequence, token: int, lp: Any, now: float) -> str:
        p = seq.params
        seq.output_ids.append(token)
        seq.token_times.append(now)
        self.stats["generated_tokens"] += 1
        if seq.is_probe:
            self.stats["generated_tokens"] -= 1
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        if lp is not None:
            seq.logprobs.append(lp)
        reason = None
        grammar_done = False
        if seq.guided is not None:
            if not seq.guided.accept(token):  # the mask allowed it, so this is a library fault
                log.error("guided decoding: %s rejected token %d it had allowed (%s); ending the sequence",
                          seq.guided.spec.describe(), token, seq.guided.error)
            grammar_done = seq.guided.done or bool(seq.guided.error)
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.tokenizer.stop_token_ids):
            reason = "stop"
        else:
            piece = seq.detok.add(token)
            seq.text += piece
            if p.stop and piece:
                tail_from = max(0, len(seq.text) - len(piece) - max(len(s) for s in p.stop))
                hits = [(seq.text.find(s, tail_from), s) for s in p.stop]
                hits = [(i, s) for i, s in hits if i >= 0]
                if hits:
                    i, s = min(hits)
                    seq.text = seq.text[: i + len(s) if p.include_stop_str_in_output else i]
                    reason = "stop"
        seq.think.update(seq.text, len(seq.output_ids))
        if reason is None and grammar_done:  # nothing but EOS may follow: the output is complete
            reason = "stop"
        if reason is None and (len(seq.output_ids) >= p.max_tokens or len(seq) >= self.max_model_len):
            reason = "length"
        if reason:
            self.scheduler.finish(seq, reason)
        return self._release_text(seq)

    @staticmethod
    def _release_text(seq: Sequence) -> str:
        """The text that became final with this step. While a sequence runs, a tail of its text that
        is a prefix of one of its stop strings is held back (it may yet turn into the stop string,
        which is cut), so concatenated deltas always equal the final text."""
        text, p = seq.text, seq.params
        end = len(text)
        if not seq.finished and p.stop and not p.include_stop_str_in_output:
            longest = max(len(s) for s in p.stop)
            for i in range(max(seq.released_chars, end - longest + 1), end):
                tail = text[i:]
                if any(s.startswith(tail) for s in p.stop):
                    end = i
                    break
        delta = text[seq.released_chars:end]
        seq.released_chars = max(seq.released_chars, end)
        return delta

    def generate(self, prompts: Iterable[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> list[RequestOutput]:
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        done = 0
        while any(not s.finished for s in seqs):
            outs = self.step()
            finished_now = sum(1 for o in outs if o.finished)
            if finished_now and on_progress:
                done += finished_now
                on_progress(done, len(seqs))
        return [RequestOutput.of(s) for s in seqs]

    def score(self, token_ids: list[int]) -> torch.Tensor:
        if len(token_ids) > self.max_model_len:
            raise PromptTooLongError(f"{len(token_ids)} tokens do not fit the context window of {self.max_model_len}")
        if self.config.torch_kv_dtype == self.config.torch_dtype:
            return self.runner.score(token_ids)
        # a quantized or float16 cache changes what attention reads: score through it, in blocks borrowed for the call
        with self.lock:
            blocks = self.block_manager.borrow(self.block_manager.blocks_needed(len(token_ids)))
        if blocks is None:
            raise RuntimeError(f"scoring {len(token_ids)} tokens through the {self.config.kv_dtype} KV cache needs "
                               f"{self.block_manager.blocks_needed(len(token_ids))} free blocks; wait for running "
                               f"requests to finish or raise kv_cache_memory_gb")
        try:
            return self.runner.score_paged(token_ids, blocks)
        finally:
            with self.lock:
                self.block_manager.give_back(blocks)
