"""ModelRunner: owns the model and the KV cache tensors; turns a scheduled step into one flat
batch (ids, positions, slot mapping, block tables), runs the forward and returns the logits of
the sequences whose last token was computed."""

from __future__ import annotations

import logging
from typing import cast

import torch

from llmopt.engine.fused_decode import FusedDecoder
from llmopt.engine.sequence import Sequence
from llmopt.kernels import kv_quant
from llmopt.models.transformer import Attention, AttnContext, MassSpan, PrefillSpan, Transformer

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, dtype: torch.dtype,
                 fused_decode: bool = True, quest_dense_layers: int | None = None):
        """``quest_dense_layers`` not None: keep the Quest key summaries (kernels/quest.py) so that
        kv_policy "quest" rows can read only their top blocks, in layers from that index on."""
        self.model = model
        self.block_size = block_size
        cfg = model.cfg
        shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype)
        self.v_cache = torch.zeros(shape, dtype=dtype)
        # an 8-bit cache (int8 / fp8) keeps one float32 scale per (token, kv head) next to it (kernels/kv_quant.py)
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        if kv_quant.is_quantized(dtype):
            self.k_scale = torch.zeros(shape[:-1], dtype=torch.float32)
            self.v_scale = torch.zeros(shape[:-1], dtype=torch.float32)
        self.observed: dict[int, list[torch.Tensor]] = {}  # SnapKV scores of the last step, by seq_id
        # final-norm hidden states of the last step's sampled rows (the rows of its logits; the difficulty probe reads
        # a prompt's last one), None before the first step and after a step that sampled nothing
        self.sampled_hidden: torch.Tensor | None = None
        # Quest: per-block min / max of the K rows, [layers, blocks, kv_heads, head_dim] each
        self.quest_dense_layers = quest_dense_layers
        self.k_min: torch.Tensor | None = None
        self.k_max: torch.Tensor | None = None
        if quest_dense_layers is not None:
            self.k_min = torch.zeros(shape[:2] + shape[3:], dtype=torch.float32)
            self.k_max = torch.zeros(shape[:2] + shape[3:], dtype=torch.float32)
        for i, layer in enumerate(model.layers):
            attn = cast(Attention, layer.self_attn)
            attn.k_cache = self.k_cache[i]
            attn.v_cache = self.v_cache[i]
            attn.k_scale = None if self.k_scale is None else self.k_scale[i]
            attn.v_scale = None if self.v_scale is None else self.v_scale[i]
            attn.k_min = None if self.k_min is None else self.k_min[i]
            attn.k_max = None if self.k_max is None else self.k_max[i]
        # decode-only steps of an int4 / GGUF / packed fp32 model run the whole layer stack in one native call
        self.fused_decode = fused_decode
        self.fused: FusedDecoder | None = None
        self.rebuild_fused()

    def rebuild_fused(self) -> FusedDecoder | None:
        """(Re)build the fused decode step from the model's current projections: after swapping
        modules (GRPO's rollout weights) the old step would still point at the old weights."""
        try:
            self.fused = FusedDecoder.build(self.model, enabled=self.fused_decode)
        except Exception as e:  # a plan that cannot be built means "op by op"
            log.warning("fused decode step unavailable (%s); using the op-by-op forward", e)
            self.fused = None
        if self.fused is not None and self.k_min is not None and self.k_max is not None and \
                not self.fused.set_quest(self.k_min, self.k_max, self.quest_dense_layers or 0):
            log.warning("fused decode step off: the Quest kernel did not build (decode runs op by op)")
            self.fused = None
        return self.fused

    @property
    def cache_tensors(self) -> list[torch.Tensor]:
        """Every tensor laid out [layers, blocks, block_size, kv_heads, ...] (what compaction moves)."""
        return [t for t in (self.k_cache, self.v_cache, self.k_scale, self.v_scale) if t is not None]

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_block(self.model, 1, self.k_cache.dtype)

    @staticmethod
    def kv_bytes_per_block(model: Transformer, block_size: int, dtype: torch.dtype, quest: bool = False) -> int:
        """K and V of every layer for ``block_size`` tokens (int8 / fp8: plus a float32 scale per token and
        head; ``quest``: plus the block's float32 key min and max per layer and kv head)."""
        c = model.cfg
        summaries = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4 if quest else 0
        if kv_quant.is_quantized(dtype):
            return 2 * c.num_layers * block_size * c.num_kv_heads * (c.head_dim + 4) + summaries
        return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * torch.finfo(dtype).bits // 8 + summaries

    def quest_topk(self, seq: Sequence, context_len: int) -> int:
        """Blocks a decode row of ``seq`` reads at ``context_len`` cached tokens: 0 (every block)
        unless its policy is quest and the budget is below the context."""
        p = seq.kv_policy
        if p is None or p.name != "quest":
            return 0
        keep = p.tokens(context_len)
        return 0 if keep is None else -(-keep // self.block_size)

    def _quest_pins(self, seqs: list[Sequence], topk: list[int], width: int) -> torch.Tensor | None:
        """uint8 [rows, layers, kv_heads, width]: the pinned blocks (block-table indices) of each Quest
        row, zeros for rows without pins; None when no row has any."""
        if not any(s.quest_pins is not None and k for s, k in zip(seqs, topk)):
            return None
        c = self.model.cfg
        out = torch.zeros(len(seqs), c.num_layers, c.num_kv_heads, width, dtype=torch.uint8)
        for i, (s, k) in enumerate(zip(seqs, topk)):
            if s.quest_pins is not None and k:
                n = min(width, s.quest_pins.shape[-1])
                out[i, :, :, :n] = s.quest_pins[:, :, :n]
        return out

    def _slots(self, seq: Sequence, start: int, n: int) -> list[int]:
        """Cache slots of tokens ``start..start+n-1``: token p lives at row ``p - num_evicted``."""
        bs, bt = self.block_size, seq.block_table
        r0 = start - seq.num_evicted
        return [bt[r // bs] * bs + r % bs for r in range(r0, r0 + n)]

    @staticmethod
    def _observe(seq: Sequence, end: int) -> int:
        """SnapKV observation window to score in a prefill chunk that ends at token ``end``, or 0
        (h2o: always, its starting attention mass; quest with pins: always, its pinned blocks; the whole
        prompt if shorter than the window)."""
        p = seq.kv_policy
        if p is None or not p.observes or seq.kv_compressed or end != len(seq):
            return 0
        if p.name != "snapkv":  # h2o, quest with pins
            return min(p.window, len(seq))
        return 0 if p.tokens(len(seq)) is None else p.window

    def _mass_span(self, seq: Sequence, q_start: int, n: int) -> MassSpan | None:
        """H2O: where the step's ``n`` rows of ``seq`` add their attention mass (None: not an h2o
        sequence past its prefill). Grows the accumulator to the rows the step will hold."""
        p = seq.kv_policy
        if p is None or p.name != "h2o" or not seq.kv_compressed:
            return None
        acc, need = seq.kv_scores, seq.kv_len + n
        assert acc is not None
        if acc.shape[-1] < need:
            acc = seq.kv_scores = torch.nn.functional.pad(acc, (0, need - acc.shape[-1] + self.block_size))
        return MassSpan(q_start, n, need, torch.tensor(seq.block_table, dtype=torch.int32), acc)

    @torch.inference_mode()
    def execute(self, batch: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor | None]:
        """Run one step. Returns (sequences to sample for, logits [len, V]); a sequence with draft tokens
        is in the list once per row of its chunk (its last token, then each draft)."""
        decodes = [(s, n) for s, n in batch if n == 1]
        prefills = [(s, n) for s, n in batch if n > 1]
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        mass: list[MassSpan] = []
        for i, (seq, _) in enumerate(decodes):
            m = self._mass_span(seq, i, 1)
            if m is not None:
                mass.append(m)
            p = seq.num_computed_tokens
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.extend(self._slots(seq, p, 1))
        spans = []
        for seq, n in prefills:
            p = seq.num_computed_tokens
            observe = self._observe(seq, p + n)
            if observe > n:
                raise RuntimeError(f"a SnapKV prefill chunk of {n} tokens cannot hold the observation window of "
                                   f"{observe} (the scheduler cuts chunks to fit it)")
            spans.append(PrefillSpan(len(ids), n, seq.kv_len + n, torch.tensor(seq.block_table, dtype=torch.int32),
                                     observe=observe))
            m = self._mass_span(seq, len(ids), n)
            if m is not None:
                mass.append(m)
            ids.extend(seq.ids_to_compute(p, n))
            pos.extend(range(p, p + n))
            slots.extend(self._slots(seq, p, n))
        # token kind per row: generated (position at or after the prompt's end) or prompt, whatever the
        # row's step kind (a one-token prompt chunk is a "decode" row; a recompute chunk holds both)
        kinds = [torch.tensor([s.num_computed_tokens >= len(s.prompt_ids) for s, _ in decodes], dtype=torch.bool)]
        kinds += [torch.arange(s.num_computed_tokens, s.num_computed_tokens + n) >= len(s.prompt_ids)
                  for s, n in prefills]
        generated = torch.cat(kinds)
        # None = every row a prompt token (a pure prefill step): the layers then skip splitting rows by kind
        ctx = AttnContext(slot_mapping=torch.tensor(slots, dtype=torch.long), num_decode=len(decodes), prefills=spans,
                          generated=generated if bool(generated.any()) else None, mass=mass)
        if decodes:
            width = max(len(s.block_table) for s, _ in decodes)
            ctx.decode_block_tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table))
                                                    for s, _ in decodes], dtype=torch.int32)
            ctx.decode_context_lens = torch.tensor([s.kv_len + 1 for s, _ in decodes], dtype=torch.int32)
            topk = [self.quest_topk(s, s.kv_len + 1) for s, _ in decodes]
            if any(topk):
                if self.quest_dense_layers is None:
                    raise RuntimeError("a kv_policy 'quest' row needs the engine's Quest key summaries "
                                       "(EngineConfig(kv_policy='quest'))")
                ctx.decode_topk = torch.tensor(topk, dtype=torch.int32)
                ctx.quest_dense_layers = self.quest_dense_layers
                ctx.decode_pins = self._quest_pins([s for s, _ in decodes], topk, width)
        input_ids, positions = torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long)
        fused_hidden = None
        if self.fused is not None:  # decode rows and short prefill chunks (chained rows); else None
            fused_hidden = self.fused.run(input_ids, positions, ctx)
        hidden = self.model(input_ids, positions, ctx) if fused_hidden is None else fused_hidden
        self.observed = {seq.seq_id: span.scores for (seq, _), span in zip(prefills, spans) if span.observe}
        # sample where the chunk reaches the end of the sequence's known tokens; a chunk with draft
        # tokens (speculative decoding) is sampled at every row: its sequence appears once per row
        rows: list[int] = []
        sample_seqs: list[Sequence] = []
        end = 0
        for seq, n in decodes + prefills:
            end += n
            if seq.draft_ids:
                rows.extend(range(end - n, end))
                sample_seqs.extend([seq] * n)
            elif seq.num_computed_tokens + n == len(seq):
                rows.append(end - 1)
                sample_seqs.append(seq)
        self.sampled_hidden = None
        if not rows:
            return [], None
        index = torch.tensor(rows)
        hidden = self.sampled_hidden = hidden[index]
        logits = self.fused.logits(hidden) if self.fused is not None and fused_hidden is not None else None
        return sample_seqs, self.model.compute_logits(hidden, generated[index]) if logits is None else logits

    @torch.inference_mode()
    def score_paged(self, token_ids: list[int], blocks: list[int]) -> torch.Tensor:
        """As :meth:`score`, but K/V go through the paged cache in ``blocks`` (enough for every token)
        and attention reads them back: what a quantized cache does to the model, measured."""
        n, bs = len(token_ids), self.block_size
        ids = torch.tensor(token_ids, dtype=torch.long)
        slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(n)], dtype=torch.long)
        ctx = AttnContext(slot_mapping=slots, prefills=[PrefillSpan(0, n, n, torch.tensor(blocks, dtype=torch.int32))])
        hidden = self.model(ids, torch.arange(n), ctx)
        logp = torch.log_softmax(self.model.compute_logits(hidden[:-1]), -1)
        return logp.gather(1, ids[1:, None])[:, 0]

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """log p(ids[i+1] | ids[:i+1]) for i in [0, len-1), float32, one causal pass, no cache."""
        ids = torch.tensor(token_ids, dtype=torch.long)
        hidden = self.model(ids, torch.arange(len(ids)), None)
        logp = torch.log_softmax(self.model.compute_logits(hidden[:-1]), -1)
        return logp.gather(1, ids[1:, None])[:, 0]
