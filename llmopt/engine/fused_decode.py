"""The fused decode step: the decoder stack of a decode step in one native call.

:class:`FusedDecoder` wraps the native ``DecodeStep`` (``llmopt.kernels.decode_step``) for a
:class:`~llmopt.models.transformer.Transformer` whose layer linears are

* int4 ``QuantLinear`` (group size 64/128/256) run with int8 activations, the engine's int4 decode
  path (``kernels.qlinear``: ``INT4_ACT == "int8"`` for ``M <= INT4_A8_MAX_M`` rows), or
* ``GGUFLinear`` (a .gguf file's own blocks, every native type of ``kernels.gguf_linear``, each
  part with its own activation mode; in the "by-kind" mode the generated rows' one, so a step with
  a prompt-token row is left to the op-by-op forward): the step calls the very kernels ``gguf_linear`` runs (the
  GGUF build's kernel table, ``gguf_linear.kernel_table``), at any row count, or
* ``PackedLinear`` (fp32 weights pre-packed for the native GEMM: the ``fp32-packed`` linear method,
  and GRPO's rollout weights): the step calls the panel kernel ``PackedLinear`` runs
  (``dense.kernel_table``), at any row count, bias included (Qwen2's qkv bias).

The paged KV cache is float32, or int8 with a float32 scale per (token, kv head)
(``EngineConfig(kv_dtype="int8")``, ``kernels.kv_quant``): the step quantizes the new token's K/V
into it with the op-by-op path's rounding and scale (the same cache bytes) and reads it with the
native int8 attention's tile loop (``csrc/kv_int8.h``, no dequantized copy of the cache).

It computes exactly what ``Transformer.forward`` computes for a decode batch (same kernels, same
order), minus the ~150 Python-level op calls and OpenMP fork/joins per step. A step with short
prefill chunks (the forced ``</think>`` text of a think budget, a jump-forward tag, a short prompt tail
after a prefix-cache hit: up to ``CHAIN_ROWS`` rows, or ``qlinear.INT4_A8_MAX_M`` for int4) runs in it
too, each chunk as consecutive decode rows of its sequence ("chained" rows: the step writes every new
K/V row before any attention reads); a chunk with a SnapKV observation window, or prompt rows in the
by-kind GGUF mode, leave the step to the op-by-op forward.

Rows of h2o sequences (``engine/kv_policy.py``, ``AttnContext.mass``) stay in the step: it also fills
their attention mass per layer (``csrc/fused_kernels.h attention_mass_row``, the op-by-op forward's
numbers bit for bit), except next to Quest rows (op by op then).

``FusedDecoder.build(model)`` returns ``None`` (and the engine keeps the op-by-op forward) when the
model does not qualify (``_why_not`` says why, logged): native kernels off or not built, float32
activations or a KV cache it cannot read missing, a linear in another format, GGUF kernels on the
torch reference path, or ``KernelSettings.fused_decode`` off (env ``LLMOPT_FUSED_DECODE=0``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from llmopt.kernels import dense, gguf_linear, kv_quant, qlinear
from llmopt.kernels.build import native_enabled
from llmopt.kernels.decode_step import native as _native
from llmopt.kernels.dense import PackedLinear
from llmopt.models.gguf_linear import GGUFLinear
from llmopt.quant.linear import QuantLinear

log = logging.getLogger(__name__)

__all__ = ["FusedDecoder", "fused_decode_enabled"]

_SLOTS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# Rows up to which a step with prefill chunks (a forced ``</think>`` tail, a jump-forward string, a
# short prompt tail after a prefix-cache hit) runs as chained rows in the step (models with int4
# linears: ``qlinear.INT4_A8_MAX_M``, the int8-activation limit, instead). SmolLM2-135M Q4_1, one
# chunk after 200 cached tokens, 1 thread, a loaded machine: the step 1.86x / 1.44x / 1.56x / 1.31x /
# 1.38x faster than the op-by-op forward at 4 / 8 / 16 / 32 / 64 rows, the same bits.
CHAIN_ROWS = 32


def fused_decode_enabled(enabled: bool = True) -> bool:
    """``enabled`` (``KernelSettings.fused_decode``) and the native kernels enabled."""
    return enabled and native_enabled()


def _linears(layer) -> tuple:
    attn, mlp = layer.self_attn, layer.mlp
    return attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj


def _why_not_linear(lin) -> str | None:
    if isinstance(lin, QuantLinear):
        if lin.fmt != "int4" or not qlinear.a8_capable(lin.qweight_packed):
            return f"is {lin.fmt} with group size {lin.group_size}, not int4 with a group size multiple of 64"
        if lin.qweight.device.type != "cpu":
            return "is not on the CPU"
        return None
    if isinstance(lin, GGUFLinear):
        native = set(gguf_linear.supported_types())
        bad = [t for t in lin.type_names if t not in native]
        if not lin.parts or bad:
            return f"has GGUF types without a native kernel ({', '.join(bad) or 'no blocks'})"
        return None
    if isinstance(lin, PackedLinear):
        packed, bias = lin.packed, lin.bias
        if packed.dtype != torch.float32 or packed.device.type != "cpu" or not packed.is_contiguous():
            return "is a PackedLinear whose packed weight is not a contiguous CPU float32 tensor"
        if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
            return "is a PackedLinear with a bias that is not CPU float32"
        return None
    return f"is a {type(lin).__name__} (the step takes int4 QuantLinear, GGUFLinear or PackedLinear)"


def _why_not_cache(attn) -> str | None:
    """Why the step cannot read and write ``attn``'s paged KV cache (None if it can): a contiguous
    float32 cache, or an int8 one with its float32 scales (``kernels.kv_quant``) whose op-by-op
    attention is the native int8 kernel (the step runs the same one)."""
    kc, vc = attn.k_cache, attn.v_cache
    if kc is None or vc is None or not kc.is_contiguous() or not vc.is_contiguous():
        return "no contiguous KV cache"
    if kc.dtype in (torch.float32, torch.float16):
        return None
    if not kv_quant.is_quantized(kc.dtype):
        return f"the KV cache is {kc.dtype} (the step takes float32, float16, int8 or fp8)"
    ks, vs = attn.k_scale, attn.v_scale
    if ks is None or vs is None or ks.dtype != torch.float32 or not ks.is_contiguous() or not vs.is_contiguous():
        return "the 8-bit KV cache has no contiguous float32 scales"
    if not kv_quant.native_available():
        return "the 8-bit KV cache's op-by-op attention runs on the torch reference (llmopt_kv did not build)"
    return None


def _why_not(model) -> str | None:
    """Why ``model`` cannot use the fused decode step (None if it can)."""
    cfg = model.cfg
    gguf = packed = False
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for name, lin in zip(_SLOTS, _linears(layer)):
            why = _why_not_linear(lin)
            if why is not None:
                return f"layer {i} {name} {why}"
            gguf |= isinstance(lin, GGUFLinear)
            packed |= isinstance(lin, PackedLinear)
        if mlp.gate_up_proj.bias is not None or mlp.down_proj.bias is not None:
            return f"layer {i} has MLP biases"
        why = _why_not_cache(attn)
        if why is not None:
            return why
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if norm.weight.dtype != torch.float32:
                return "norm weights are not float32"
    if cfg.num_heads % cfg.num_kv_heads:
        return "num_heads not a multiple of num_kv_heads"
    if gguf and gguf_linear.kernel_table() is None:
        return "the GGUF projections run on the torch reference path (no native GGUF build for this CPU)"
    if packed and dense.kernel_table() is None:
        return "the packed fp32 projections have no native GEMM (llmopt_sgemm did not build)"
    return None


def _row_tables(ctx, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block table and context length of every row of ``ctx`` (decode rows, then each prefill chunk's
    rows, each over its own context up to itself: what ``Attention._paged`` gives the kernel)."""
    nd = ctx.num_decode
    tables: list[torch.Tensor] = [] if not nd else [ctx.decode_block_tables[:nd]]
    lens: list[torch.Tensor] = [] if not nd else [ctx.decode_context_lens[:nd]]
    for span in ctx.prefills:
        bt = span.block_table[: (span.ctx_len + block_size - 1) // block_size].to(torch.int32)
        tables.append(bt.unsqueeze(0).expand(span.q_len, -1))
        lens.append(torch.arange(span.ctx_len - span.q_len + 1, span.ctx_len + 1, dtype=torch.int32))
    width = max(t.shape[1] for t in tables)
    return torch.cat([F.pad(t, (0, width - t.shape[1])) for t in tables]), torch.cat(lens)


def _quest_pins(ctx, m: int, width: int) -> torch.Tensor | None:
    """Quest pins of the step's rows as the native step takes them: uint8 [m, layers, Hk, width] (rows
    past the decode rows, chained prompt rows, read every block and have none), or None."""
    from llmopt.models.transformer import pad_pins

    pins = getattr(ctx, "decode_pins", None)
    return None if pins is None else pad_pins(pins, m, width)


class FusedDecoder:
    """``run(input_ids, positions, ctx)`` -> final-normed hidden states ``[M, hidden]`` of a step, or
    ``None`` when this step must take the op-by-op path (int4 linears: more rows than the
    int8-activation limit, or int4 activations switched to exact; prefill chunks over ``chain_rows``
    rows in all or with a SnapKV observation window).

    A step with short prefill chunks runs in the step as "chained" rows: chunk row i is a decode row
    of its sequence with context ``kv_len + i + 1`` (every new K/V row is written before any attention
    reads), the same bits as its tokens one step at a time.

    ``steps`` counts the decode steps the native step ran; ``fallbacks`` the ones it handed back to the
    op-by-op forward, by reason (the first of each reason is logged at INFO): nothing falls back silently."""

    def __init__(self, model, step, head=None, int4: bool = True, by_kind: bool = False):
        self.model = model
        self.step = step
        self.head = head
        self.int4 = int4  # int4 linears in the step: the int4 decode path's row limit applies
        # GGUF linears in the "by-kind" mode: the step runs their generated-row activations (int8), so a
        # step with a prompt-token row (a one-token prompt chunk) takes the op-by-op forward
        self.by_kind = by_kind
        self._cache_ptr = model.layers[0].self_attn.k_cache.data_ptr()
        self.kv_dtype = model.layers[0].self_attn.k_cache.dtype
        self.block_size = model.layers[0].self_attn.k_cache.shape[1]
        self.chain_rows = qlinear.INT4_A8_MAX_M if int4 else CHAIN_ROWS
        self.steps = 0
        self.fallbacks: dict[str, int] = {}

    @classmethod
    def build(cls, model, tiles: bool | None = None, enabled: bool = True) -> FusedDecoder | None:
        """``tiles``: the 4-column GEMV tiles from 4 rows (default ``qlinear.TILES``; env
        ``KernelSettings.decode_tiles``), else the column kernel at every row count (int4 linears).
        ``enabled``: ``KernelSettings.fused_decode``."""
        if not fused_decode_enabled(enabled):
            return None
        why = _why_not(model)
        if why is not None:
            log.info("fused decode step not used (decode runs op by op): %s", why)
            return None
        ext = _native()
        if ext is None:
            log.info("fused decode step not used (decode runs op by op): llmopt_decode did not build")
            return None
        cfg = model.cfg
        if tiles is None:
            tiles = qlinear.TILES  # KernelSettings.decode_tiles, set by the engine
        none = torch.empty(0)
        tensors: list[torch.Tensor] = []
        windows: list[int] = []
        for layer in model.layers:
            attn = layer.self_attn
            int8 = kv_quant.is_quantized(attn.k_cache.dtype)  # then its scales ride along (kernels/kv_quant.py)
            tensors += [layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                        attn.q_norm.weight.detach() if attn.q_norm is not None else none,
                        attn.k_norm.weight.detach() if attn.k_norm is not None else none,
                        attn.k_cache, attn.v_cache, attn.k_scale if int8 else none, attn.v_scale if int8 else none]
            windows.append(-1 if attn.window is None else int(attn.window))
        step = ext.DecodeStep(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                              float(cfg.rms_norm_eps), float(model.layers[0].self_attn.scale), tensors, windows,
                              model.norm.weight.detach(), model.rope_table(torch.float32))
        int4 = dense_set = gguf_set = False  # each kernel table is handed over at its first projection
        for i, layer in enumerate(model.layers):
            for slot, lin in enumerate(_linears(layer)):
                bias = none if lin.bias is None else lin.bias.detach().float().contiguous()
                if isinstance(lin, PackedLinear):
                    if not dense_set:
                        step.set_dense_kernels(dense.kernel_table())
                        dense_set = True
                    step.set_dense(i, slot, lin.packed.detach(), bias)
                elif isinstance(lin, GGUFLinear):
                    if not gguf_set:
                        table = gguf_linear.kernel_table()
                        assert table is not None  # why_not checked
                        step.set_gguf_kernels(table.capsule, table.small_m)
                        gguf_set = True
                    step.set_gguf(i, slot, [p.data for p in lin.parts], [p.ggml_type for p in lin.parts],
                                  [p.out_features for p in lin.parts], [a == "int8" for a in lin.acts], bias)
                else:
                    # int4: qweight, scales, mins, their 4-column interleaved copies (shared with the
                    # op-by-op path, qlinear.interleaved_scales; empty: column kernel only)
                    int4 = True
                    sc4, mn4 = qlinear.interleaved_scales(lin.qweight_packed) if tiles else (None, None)
                    step.set_int4(i, slot, lin.qweight, lin.scales, lin.mins, none if sc4 is None else sc4,
                                  none if mn4 is None else mn4, bias, lin.group_size)
        by_kind = any(isinstance(lin, GGUFLinear) and lin.acts != lin.prompt_acts
                      for layer in model.layers for lin in _linears(layer))
        fused = cls(model, step, cls._head(ext, model), int4=int4, by_kind=by_kind)
        kinds = sorted({type(lin).__name__ for layer in model.layers for lin in _linears(layer)})
        log.info("fused decode step on: %d layers, %s projections, %s KV cache", len(model.layers),
                 "/".join(kinds), str(fused.kv_dtype).removeprefix("torch."))
        return fused

    @staticmethod
    def _head(ext, model):
        """The lm_head as an int8 x int8-activation linear (``I8Linear``) when it is an int8 QuantLinear
        with fp16 group scales, else None (the head then runs as the model's own module)."""

        head = model.lm_head
        if not isinstance(head, QuantLinear) or head.fmt != "int8" or head.scales.dtype != torch.float16:
            return None
        gs = head.group_size
        if gs not in (32, 64, 128, 256) or head.in_features % gs or head.out_features % 4:
            return None
        return ext.I8Linear(head.qweight, head.scales, head.in_features, gs, head.bias)

    def why_unusable(self, num_rows: int) -> str | None:
        """Why a decode step of ``num_rows`` rows cannot run here (None if it can)."""
        if self.int4 and qlinear.INT4_ACT != "int8":
            return "int4 activations are exact (INT4_ACT), the step quantizes them to int8"
        if self.int4 and num_rows > qlinear.INT4_A8_MAX_M:
            return f"more rows than the int4 int8-activation limit ({qlinear.INT4_A8_MAX_M})"
        if self.model.layers[0].self_attn.k_cache.data_ptr() != self._cache_ptr:
            return "the KV cache was reallocated after the step was built"
        return None

    def usable(self, num_rows: int) -> bool:
        return self.why_unusable(num_rows) is None

    def _fallback(self, why: str) -> None:
        n = self.fallbacks.get(why, 0)
        self.fallbacks[why] = n + 1
        if n == 0:
            log.info("fused decode step: a decode step runs op by op: %s (further ones counted, not logged)", why)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor | None:
        m = input_ids.shape[0]
        why = self.why_unusable(m)
        chained = bool(ctx.prefills)
        if why is None and chained:
            why = self._why_not_chained(ctx, m)
        elif why is None and ctx.num_decode != m:
            why = "the step has prefill tokens"
        if why is None and self.by_kind and (ctx.generated is None or not bool(ctx.generated.all())):
            why = "the step has prompt-token rows (by-kind GGUF activations)"
        if why is None:
            x = self.model.embed_tokens(input_ids)
            if x.dtype == torch.float32:
                if chained:
                    tables, lens = _row_tables(ctx, self.block_size)
                else:
                    tables, lens = ctx.decode_block_tables, ctx.decode_context_lens
                topk = getattr(ctx, "decode_topk", None)
                if topk is not None and topk.shape[0] < m:  # chained prompt / forced rows read every block
                    topk = torch.cat([topk, topk.new_zeros(m - topk.shape[0])])
                spans = getattr(ctx, "mass", None)  # H2O rows: their attention mass, filled by the step
                if not spans:
                    self.steps += 1
                    return self.step.run(x.contiguous(), positions, ctx.slot_mapping, tables, lens, chained, topk,
                                         None, None, _quest_pins(ctx, m, tables.shape[1]))
                if self.kv_dtype == torch.float16:
                    why = "h2o rows on a float16 KV cache (their attention mass is computed op by op)"
                elif topk is None:
                    self.steps += 1
                    return self._run_with_mass(x, positions, ctx.slot_mapping, tables, lens, chained, spans)
                else:
                    why = "the step has h2o rows and Quest rows"
            else:
                why = f"the embeddings are {x.dtype}, not float32"
        self._fallback(why)
        return None

    def _run_with_mass(self, x, positions, slots, tables, lens, chained: bool, spans) -> torch.Tensor:
        """A step with H2O rows: the native step fills their attention mass per layer (the op-by-op
        forward's numbers, csrc/decode.cpp), added to the sequences' accumulators as there."""
        from llmopt.models.transformer import add_mass, mass_rows

        rows, row_lens = mass_rows(spans)
        flags = torch.zeros(x.shape[0], dtype=torch.int32)
        flags[rows] = 1
        n_layers = len(self.model.layers)
        kv_heads = self.model.cfg.num_kv_heads
        mass = torch.zeros(x.shape[0], n_layers, kv_heads, int(row_lens.max()))
        hidden = self.step.run(x.contiguous(), positions, slots, tables, lens, chained, None, mass, flags)
        add_mass(spans, mass[rows], slice(None))  # every layer in one add per span
        return hidden

    def _why_not_chained(self, ctx, m: int) -> str | None:
        """Why a step with prefill chunks cannot run as chained rows (None if it can)."""
        if m > self.chain_rows:
            return f"the step has prefill tokens (more than {self.chain_rows} rows)"
        start = ctx.num_decode
        for span in ctx.prefills:
            if span.observe:
                return "the step has prefill tokens (a SnapKV observation window)"
            if span.block_table is None or span.q_start != start:
                return "the step has prefill tokens (a chunk without its block table or out of row order)"
            start += span.q_len
        if start != m:
            return "the step has prefill tokens (rows that are in no chunk)"
        return None

    def set_quest(self, k_min: torch.Tensor, k_max: torch.Tensor, dense_layers: int) -> bool:
        """Keep the Quest key summaries ([layers, blocks, kv_heads, head_dim] each, kernels/quest.py)
        up to date and let rows with a ``ctx.decode_topk`` read only their top blocks, as the op-by-op
        forward does; False (the step must not run) when the op-by-op Quest kernel is not native."""
        from llmopt.kernels import quest

        if not quest.native_available():
            return False
        self.step.set_quest(k_min, k_max, dense_layers)
        return True

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits of decode rows through the int8-activation head, or None (use ``compute_logits``)."""
        if self.head is None or not self.usable(hidden.shape[0]) or hidden.dtype != torch.float32:
            return None
        return self.head(hidden.contiguous())
