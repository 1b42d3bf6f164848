"""One decoder for the llama, qwen2 and qwen3 architectures.

The differences are config flags (``ModelConfig``): q/k/v bias, o_proj bias, q/k RMSNorm, tied
embeddings, GQA, rope parameters and per-layer sliding windows. Projections are fused the way
serving engines do it: one ``qkv_proj`` and one ``gate_up_proj`` per layer, so one matmul reads
the activations once; ``load_weights`` packs the Hugging Face tensors into them.

``forward`` takes one flat batch of tokens (``input_ids`` and ``positions``, both ``[T]``) and an
``AttnContext`` that says which tokens belong to which sequence and where their K/V live in the
paged cache. With ``ctx=None`` it runs one sequence with causal attention and no cache (scoring,
tests). Decode tokens come first in the batch, one per sequence; prefill chunks follow.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llmopt.config import ModelConfig
from llmopt.kernels import kv_quant, ops, quest
from llmopt.kernels.kv_select import attention_mass, observation_scores, paged_keys
from llmopt.models.linear import QuantConfig, project


@dataclass
class PrefillSpan:
    """A run of ``q_len`` new tokens of one sequence whose context (cached prefix + these) is
    ``ctx_len`` tokens long; ``block_table`` (int32) locates the context in the paged cache."""

    q_start: int
    q_len: int
    ctx_len: int
    block_table: torch.Tensor | None
    # SnapKV (engine/kv_policy.py): when > 0, each layer appends to ``scores`` the attention of the
    # chunk's last ``observe`` queries over the whole context, per kv head ([Hk, ctx_len] float32)
    observe: int = 0
    scores: list[torch.Tensor] = field(default_factory=list)


@dataclass
class MassSpan:
    """H2O (engine/kv_policy.py): rows ``q_start .. q_start + q_len - 1`` are the last queries of a
    sequence whose context is ``ctx_len`` cache rows (``block_table``, int32); each layer adds their
    softmax attention over the context, summed over the rows and the query heads of each kv head,
    to ``acc[layer, :, :ctx_len]`` (``acc``: float32 [layers, kv_heads, >= ctx_len])."""

    q_start: int
    q_len: int
    ctx_len: int
    block_table: torch.Tensor
    acc: torch.Tensor


def mass_rows(spans: list[MassSpan]) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch rows of H2O spans, in span order, and each row's context length (int32)."""
    rows = torch.cat([torch.arange(m.q_start, m.q_start + m.q_len) for m in spans])
    lens = torch.cat([torch.arange(m.ctx_len - m.q_len + 1, m.ctx_len + 1, dtype=torch.int32) for m in spans])
    return rows, lens


def add_mass(spans: list[MassSpan], mass: torch.Tensor, layers: int | slice) -> None:
    """Add the mass of the spans' rows to their accumulators: one layer's (``layers`` an int, ``mass``
    [rows in span order, Hk, >= max context], contiguous) or that of a slice of layers at once
    (``mass`` [rows, layers, Hk, >= max context]). A span's rows are summed, then added (the op-by-op
    forward and the fused step both go through here, so an h2o sequence gets the same bits on either
    path)."""
    r = 0
    for m in spans:
        rows = mass[r:r + m.q_len]
        if m.q_len == 1:
            part = rows[0]
        elif isinstance(layers, int):
            part = rows.sum(0)
        else:  # layer by layer as a contiguous [q_len, Hk, W]: torch's summation order follows the layout
            part = torch.stack([rows[:, i].contiguous().sum(0) for i in range(rows.shape[1])])
        m.acc[layers, ..., :m.ctx_len] += part[..., :m.ctx_len]
        r += m.q_len


def pad_pins(pins: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """Quest pins ``[n, ..., w]`` (n <= rows decode rows) shaped for a kernel call over ``rows`` rows and
    block tables ``width`` wide: cut or zero-padded to ``width`` blocks, zero rows (no pins) appended."""
    pins = pins[..., :width]
    pad = [0, width - pins.shape[-1]] + [0, 0] * (pins.dim() - 2) + [0, rows - pins.shape[0]]
    return F.pad(pins, pad).contiguous()


@dataclass
class AttnContext:
    slot_mapping: torch.Tensor | None  # [T] int64: cache slot (block * block_size + offset) per token
    num_decode: int = 0  # the first num_decode tokens are single-token decodes
    decode_block_tables: torch.Tensor | None = None  # int32 [num_decode, max_blocks]
    decode_context_lens: torch.Tensor | None = None  # int32 [num_decode], includes the new token
    prefills: list[PrefillSpan] = field(default_factory=list)
    # bool [T]: True where the token was generated (position >= its sequence's prompt length), False
    # for a prompt token (prefill, recompute after preemption); None: all prompt tokens. Projections
    # whose precision goes by token kind read it (models.linear.TokenKindLinear).
    generated: torch.Tensor | None = None
    # Quest sparse decode attention (kernels/quest.py): int32 [num_decode] blocks each decode row reads
    # (0: every block); None: all dense. Layers below quest_dense_layers attend densely.
    decode_topk: torch.Tensor | None = None
    quest_dense_layers: int = 0
    # Quest pins: uint8 [num_decode, layers, kv_heads, max_blocks], nonzero where a row's block (index into
    # its block table) is pinned for that layer and kv head (read first, within topk); None: no pins
    decode_pins: torch.Tensor | None = None
    # H2O attention mass to accumulate (one entry per h2o sequence with rows in the step)
    mass: list[MassSpan] = field(default_factory=list)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, qc: QuantConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.window = cfg.layer_windows[layer_idx]
        self.layer_idx = layer_idx
        prefix = f"layers.{layer_idx}.self_attn"
        self.qkv_proj = qc.method_for(f"{prefix}.qkv_proj").create(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.attention_bias, f"{prefix}.qkv_proj")
        self.o_proj = qc.method_for(f"{prefix}.o_proj").create(self.q_size, cfg.hidden_size, cfg.o_bias,
                                                                f"{prefix}.o_proj")
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        # Paged cache [num_blocks, block_size, num_kv_heads, head_dim]; set by the engine's runner.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        # int8 cache: float32 scales [num_blocks, block_size, num_kv_heads] (kernels/kv_quant.py)
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        # Quest key summaries, float32 [num_blocks, num_kv_heads, head_dim] (kernels/quest.py); set by
        # the runner when the engine serves kv_policy "quest", updated whenever K rows are written
        self.k_min: torch.Tensor | None = None
        self.k_max: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                ctx: AttnContext | None) -> torch.Tensor:
        gen = None if ctx is None else ctx.generated
        return project(self.o_proj, self.attend(project(self.qkv_proj, x, gen), positions, cos_sin, ctx), gen)

    def attend(self, qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
               ctx: AttnContext | None) -> torch.Tensor:
        """Everything between ``qkv_proj`` and ``o_proj``: split, q/k norm, rope, attention.
        Returns the ``o_proj`` input ``[T, num_heads * head_dim]``."""
        T = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        else:
            q, k = q.contiguous(), k.contiguous()
        ops.rope_(q, k, positions, cos_sin)
        if ctx is None:
            out = self._causal(q, k, v, self.window)
        else:
            out = self._paged(q, k, v, ctx)
        return out.reshape(T, self.q_size)

    def _causal(self, q, k, v, window) -> torch.Tensor:
        """Causal attention of a whole sequence (no cache): q [n, Hq, D] over k/v [n, Hk, D], within the
        sliding window if the layer has one."""
        qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        if window is None:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            pos = torch.arange(q.shape[0], device=q.device)
            mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return out.transpose(0, 1)

    def _paged(self, q, k, v, ctx: AttnContext) -> torch.Tensor:
        kc, vc = self.k_cache, self.v_cache
        if kc is None or vc is None or ctx.slot_mapping is None:
            raise RuntimeError("paged attention needs the KV cache (ModelRunner sets it) and a slot mapping")
        bs = kc.shape[1]
        ksc, vsc = self.k_scale, self.v_scale
        quant = kv_quant.is_quantized(kc.dtype)
        if quant:  # int8 / fp8 cache: attention reads the quantized K/V in prefill and decode alike
            if ksc is None or vsc is None:
                raise RuntimeError("an 8-bit KV cache needs its scales (ModelRunner sets them)")
            kv_quant.write_kv_int8(kc, ksc, ctx.slot_mapping, k)
            kv_quant.write_kv_int8(vc, vsc, ctx.slot_mapping, v)
        else:
            flat_k, flat_v = kc.view(-1, self.num_kv_heads, self.head_dim), vc.view(-1, self.num_kv_heads, self.head_dim)
            flat_k.index_copy_(0, ctx.slot_mapping, k.to(kc.dtype))
            flat_v.index_copy_(0, ctx.slot_mapping, v.to(vc.dtype))
        if self.k_min is not None and self.k_max is not None:  # Quest summaries of the rows as attention reads them
            rows = kc.view(-1, self.num_kv_heads, self.head_dim)[ctx.slot_mapping]
            rows = kv_quant.dequantize_kv(rows, ksc.view(-1, self.num_kv_heads)[ctx.slot_mapping]) if quant else rows  # type: ignore[union-attr]
            quest.update_summaries(self.k_min, self.k_max, rows, ctx.slot_mapping, bs)
        nd = ctx.num_decode
        tables, lens = ctx.decode_block_tables, ctx.decode_context_lens
        if nd and (tables is None or lens is None):
            raise RuntimeError("decode tokens need decode_block_tables and decode_context_lens")
        topk = ctx.decode_topk
        if topk is not None and self.layer_idx < ctx.quest_dense_layers:
            topk = torch.zeros_like(topk)  # every block, through the same kernel (no token splits, as the fused step)
        if topk is not None and (self.k_min is None or self.k_max is None or self.window is not None):
            raise RuntimeError("Quest attention needs the key summaries (ModelRunner sets them) and full-attention layers")

        def attend_rows(qr: torch.Tensor, tb: torch.Tensor, ln: torch.Tensor) -> torch.Tensor:
            if topk is not None:  # decode rows read their top blocks; prefill rows (topk 0) every block
                tk = F.pad(topk, (0, qr.shape[0] - topk.shape[0]))
                pins = None if ctx.decode_pins is None else pad_pins(ctx.decode_pins[:, self.layer_idx],
                                                                     qr.shape[0], tb.shape[1])
                return quest.quest_decode_attention(qr, kc, vc, ksc, vsc, self.k_min, self.k_max, tb, ln, tk,  # type: ignore[arg-type]
                                                    self.scale, pins)
            if quant:
                return kv_quant.paged_decode_attention_int8(qr, kc, vc, ksc, vsc, tb, ln,  # type: ignore[arg-type]
                                                            self.scale, self.window)
            return ops.paged_decode_attention(qr, kc, vc, tb, ln, self.scale, self.window)

        if nd == q.shape[0]:  # a pure decode step: the kernel's output is the whole result
            out = attend_rows(q, tables, lens)  # type: ignore[arg-type]
            self._accumulate_mass(q, ctx.mass)
            return out
        # Prefill rows take the same one-query kernel as decode rows, each query over its own context
        # (the cached prefix and its chunk up to itself, all written above): a row's attention has one
        # summation order however the prompt was chunked (prefix-cache hits, the token budget,
        # recompute after preemption) and whatever else is in the batch.
        row_tables: list[torch.Tensor] = [] if tables is None else [tables[:nd]]
        row_lens: list[torch.Tensor] = [] if lens is None else [lens[:nd]]
        for span in ctx.prefills:
            if span.block_table is None:
                raise RuntimeError("a prefill chunk needs its block table")
            bt = span.block_table[: (span.ctx_len + bs - 1) // bs].to(torch.int32)
            row_tables.append(bt.unsqueeze(0).expand(span.q_len, -1))
            row_lens.append(torch.arange(span.ctx_len - span.q_len + 1, span.ctx_len + 1, dtype=torch.int32))
        width = max(t.shape[1] for t in row_tables)
        all_tables = torch.cat([F.pad(t, (0, width - t.shape[1])) for t in row_tables])
        out = attend_rows(q, all_tables, torch.cat(row_lens))
        for span in ctx.prefills:
            if span.observe:
                assert span.block_table is not None  # checked above
                sl = slice(span.q_start, span.q_start + span.q_len)
                keys = paged_keys(kc, ksc, span.block_table, span.ctx_len, q.dtype)  # the whole context's K
                span.scores.append(observation_scores(q[sl][-span.observe:], keys, self.scale))
        self._accumulate_mass(q, ctx.mass)
        return out

    def _accumulate_mass(self, q: torch.Tensor, spans: list[MassSpan]) -> None:
        """H2O: every row of the spans' softmax attention over its context (row i of a span of q_len
        sees ctx_len - q_len + i + 1 rows, as it attended), summed over the group's query heads
        (``kv_select.attention_mass``: native for float32 and 8-bit caches, one call for the step's
        rows), then over the span's rows, added to the span's accumulator. A row's numbers do not
        depend on the rest of the batch."""
        if not spans:
            return
        kc = self.k_cache
        assert kc is not None
        rows, lens = mass_rows(spans)
        width = max(m.block_table.shape[0] for m in spans)
        tables = torch.cat([F.pad(m.block_table, (0, width - m.block_table.shape[0])).expand(m.q_len, width)
                            for m in spans])
        add_mass(spans, attention_mass(q[rows], kc, self.k_scale, tables, lens, self.scale), self.layer_idx)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, qc: QuantConfig):
        super().__init__()
        prefix = f"layers.{layer_idx}.mlp"
        self.gate_up_proj = qc.method_for(f"{prefix}.gate_up_proj").create(
            cfg.hidden_size, 2 * cfg.intermediate_size, False, f"{prefix}.gate_up_proj")
        self.down_proj = qc.method_for(f"{prefix}.down_proj").create(
            cfg.intermediate_size, cfg.hidden_size, False, f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor, generated: torch.Tensor | None = None) -> torch.Tensor:
        return project(self.down_proj, ops.silu_mul(project(self.gate_up_proj, x, generated)), generated)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, qc: QuantConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx, qc)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer_idx, qc)

    def forward(self, x, residual, positions, cos_sin, ctx):
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = ops.add_rms_norm(x, residual, self.input_layernorm.weight, self.input_layernorm.eps)
        h = self.self_attn(h, positions, cos_sin, ctx)
        h, residual = ops.add_rms_norm(h, residual, self.post_attention_layernorm.weight,
                                       self.post_attention_layernorm.eps)
        return self.mlp(h, None if ctx is None else ctx.generated), residual


class Transformer(nn.Module):
    cos_sin: torch.Tensor  # [max_positions, head_dim] rope table (a buffer)

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None, quant_config: QuantConfig | None = None):
        """``quant_config`` says which linear method each projection uses (default: float
        ``nn.Linear`` everywhere, the Hugging Face model); see :mod:`llmopt.models.linear`."""
        super().__init__()
        self.cfg = cfg
        self.quant_config = qc = quant_config or QuantConfig()
        self.embed_tokens = qc.embedding.create(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, qc) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = qc.method_for("lm_head").create(cfg.hidden_size, cfg.vocab_size, False, "lm_head")
        self.register_buffer("cos_sin", torch.empty(max_positions or cfg.max_position_embeddings, cfg.head_dim),
                             persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the rope table and re-tie embeddings (needed after ``to_empty``)."""
        if (self.cfg.tie_word_embeddings and type(self.lm_head) is nn.Linear
                and type(self.embed_tokens) is nn.Embedding):
            self.lm_head.weight = self.embed_tokens.weight
        if self.cos_sin.is_meta:
            return
        inv_freq, attn_scale = self.cfg.rope_inv_freq()
        freqs = torch.arange(self.cos_sin.shape[0], dtype=torch.float32)[:, None] * inv_freq[None, :]
        # [max_pos, head_dim]: cos in the first half, sin in the second (see kernels.ops.rope_)
        self.cos_sin = torch.cat([freqs.cos() * attn_scale, freqs.sin() * attn_scale], -1).to(self.cos_sin.device)

    def rope_table(self, dtype: torch.dtype) -> torch.Tensor:
        """The rope table in the activations' dtype, as the layers get it."""
        return self.cos_sin if dtype == torch.float32 else self.cos_sin.to(dtype)

    @property
    def max_positions(self) -> int:
        return self.cos_sin.shape[0]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: AttnContext | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm."""
        x = self.embed_tokens(input_ids)
        cos_sin = self.rope_table(x.dtype)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, cos_sin, ctx)
        if residual is None:  # a model without layers
            return self.norm(x)
        return self.final_norm(x, residual)

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The last layer's output plus its residual stream, normalized: the lm_head input."""
        x, _ = ops.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)
        return x

    def compute_logits(self, hidden: torch.Tensor, generated: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``hidden`` rows; ``generated``: their token kinds (see ``AttnContext.generated``)."""
        return project(self.lm_head, hidden, generated).float()

    # ---- weights -------------------------------------------------------------------------------
    PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")

    def projection_names(self) -> list[str]:
        """Module names of every projection, in model order (``layers.0.self_attn.qkv_proj`` ...
        ``lm_head``): the names ``QuantConfig.method_for`` is asked with."""
        return [f"layers.{i}.{p}" for i in range(len(self.layers)) for p in self.PROJECTIONS] + ["lm_head"]

    @torch.no_grad()
    def process_weights_after_loading(self) -> None:
        """Give every projection, then the embedding, its method's final form (once, after loading:
        the loader calls this). Projections of one method run in model order; the embedding last,
        so it can share the final ``lm_head``."""
        qc = self.quant_config
        for name in self.projection_names():
            mod = self.get_submodule(name)
            new = qc.method_for(name).process_after_loading(mod, name)
            if new is not mod:
                self.set_submodule(name, new)
        self.embed_tokens = qc.embedding.process_after_loading(self.embed_tokens, self.lm_head,
                                                               self.cfg.tie_word_embeddings)

    _STACKED = {  # HF name part -> (our module, shard index)
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def _shard_ranges(self, module: str) -> list[tuple[int, int]]:
        c = self.cfg
        if module == "qkv_proj":
            q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
            return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]
        i = c.intermediate_size
        return [(0, i), (i, 2 * i)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> None:
        """Load Hugging Face-named tensors (``model.layers.0.self_attn.q_proj.weight`` ...)."""
        params = dict(self.named_parameters())
        seen: set[str] = set()
        expected = set(params)
        if self.cfg.tie_word_embeddings:
            expected.discard("lm_head.weight")
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            target, shard = name, None
            for part, (module, idx) in self._STACKED.items():
                if f".{part}." in name:
                    target, shard = name.replace(part, module), idx
                    break
            if target not in params:
                if strict:
                    raise KeyError(f"checkpoint tensor {name!r} has no place in the {self.cfg.arch} model")
                continue
            p = params[target]
            with torch.no_grad():
                if shard is None:
                    if tuple(p.shape) != tuple(tensor.shape):
                        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                                         f"the model expects {tuple(p.shape)}")
                    p.copy_(tensor)
                    seen.add(target)
                else:
                    lo, hi = self._shard_ranges(target.split(".")[-2])[shard]
                    if tensor.shape[0] != hi - lo or tuple(tensor.shape[1:]) != tuple(p.shape[1:]):
                        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                                         f"the model expects {(hi - lo, *p.shape[1:])}")
                    p[lo:hi].copy_(tensor)
                    seen.add(f"{target}#{shard}")
        missing = []
        for t in sorted(expected):
            mod = t.split(".")[-2]
            if mod in ("qkv_proj", "gate_up_proj"):
                n = len(self._shard_ranges(mod)) if t.endswith("weight") or mod == "qkv_proj" else 0
                missing += [f"{t}#{i}" for i in range(n) if f"{t}#{i}" not in seen]
            elif t not in seen:
                missing.append(t)
        if missing and strict:
            raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
