"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), after the IST-DASLab reference ``fasterquant`` (also in AutoGPTQ).

For a linear with weight ``W [N, K]`` and calibration inputs ``X [n, K]`` GPTQ minimises
``||X W^T - X Q^T||^2`` column by column: quantize column ``k``, then spread its error over the
not-yet-quantized columns with the inverse Hessian ``H^-1`` of ``H = 2 X^T X / n`` (dampened by
``damp * mean(diag H)``). ``H^-1`` enters through its upper Cholesky factor (float64), and the
updates are applied lazily in blocks of ``block_size`` columns. Group parameters (scale / min)
are computed on the fly from the *updated* weights when the column loop reaches a group's first
column, using the same rules as RTN (:mod:`llmopt.formats.rtn`: fp16 scale+min from the group
range; optional clipping search), so the codes + params are exactly the plain grouped layout of
:mod:`llmopt.formats.layouts` and ``QuantLinear`` runs them with the native kernels.
``act_order=True`` quantizes columns in decreasing ``diag(H)`` order with the group parameters
fixed up front from the original weights ("static groups"), so the stored layout stays the plain
grouped one.

Model level (:func:`gptq_quantize_model`): the standard sequential scheme, over the decoder
layers of our :class:`~llmopt.models.transformer.Transformer`, and inside each layer "true
sequential" in forward order ``qkv_proj -> o_proj -> gate_up_proj -> down_proj``: every linear's
Hessian is accumulated from inputs computed with *all* previously quantized linears (earlier
layers and earlier linears of the same layer). The layer is run in stages (see
:func:`layer_stages`), one pass per layer, so the cost is about one forward of the calibration
set plus ``X^T X`` accumulation and the column loops (~1-2 s per layer of SmolLM2-135M).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from llmopt.formats import rtn
from llmopt.formats.layouts import FORMATS, QuantizedWeight, dequantize, effective_group_size, pack_lanes
from llmopt.formats.layouts import quantize as rtn_quantize
from llmopt.kernels import ops

from .linear import DEFAULT_SKIP, QuantLinear

log = logging.getLogger(__name__)

__all__ = [
    "GPTQ_FORMATS",
    "gptq_quantize_weight",
    "gptq_quantize_model",
    "pack_codes",
    "output_error",
    "layer_stages",
]

GPTQ_FORMATS = ("int4", "int3", "int2", "int8", "w4a8")
Progress = Callable[[int, int, str], None]  # (done, total, what), as llmopt.quant.mixed


# --------------------------------------------------------------------------------------------
# packing of codes + params (same layouts as formats.quantize)
# --------------------------------------------------------------------------------------------

def _round_up(a: int, b: int) -> int:
    return (a + b - 1) // b * b


def pack_codes(fmt: str, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
               group_size: int) -> QuantizedWeight:
    """Pack natural-order codes ``q [N, K]`` (``[0, 2**bits)`` for the affine formats,
    ``[-127, 127]`` for int8) and per-group ``scales``/``mins [N, K/gs]`` into ``fmt``'s layout
    (see the table in :mod:`llmopt.formats.layouts`)."""
    n, k = q.shape
    spec = FORMATS[fmt]
    t: dict[str, torch.Tensor] = {}
    if fmt in ("int4", "int2"):
        t["qweight"] = pack_lanes(q, spec.bits)
    elif fmt == "int3":  # 2-bit plane block (32 B) then the 1-bit plane (8 x uint16 lanes, 16 B)
        lo = pack_lanes(q & 3, 2).reshape(n, -1, 32)
        hi = pack_lanes(q >> 2, 1, lane_bits=16).reshape(n, -1, 16)
        t["qweight"] = torch.cat([lo, hi], dim=2).reshape(n, -1)
    elif fmt == "w4a8":  # per 64-block, byte i = q[i] | q[i + 32] << 4
        kp = _round_up(k, 64)
        qq = torch.zeros(n, kp, dtype=torch.int64, device=q.device)
        qq[:, :k] = q.to(torch.int64)
        qq = qq.reshape(n, kp // 64, 2, 32)
        t["qweight"] = (qq[:, :, 0] | (qq[:, :, 1] << 4)).to(torch.uint8).reshape(n, kp // 2)
    elif fmt == "int8":
        kp = _round_up(k, 32)
        qq = torch.zeros(n, kp, dtype=torch.int8, device=q.device)
        qq[:, :k] = q.to(torch.int8)
        t["qweight"] = qq
    else:
        raise ValueError(f"pack_codes: {fmt} is not a grouped integer format ({', '.join(GPTQ_FORMATS)})")
    t["scales"] = scales.contiguous()
    if spec.affine:
        if mins is None:
            raise ValueError(f"{fmt} needs mins")
        t["mins"] = mins.contiguous()
    return QuantizedWeight(fmt, (n, k), group_size, t)


# --------------------------------------------------------------------------------------------
# one weight
# --------------------------------------------------------------------------------------------

class _GroupQuantizer:
    """Per-group parameters with RTN's rules; quantizes one column at a time."""

    def __init__(self, fmt: str, group_size: int, scale_dtype: torch.dtype, search: bool):
        spec = FORMATS[fmt]
        self.affine = spec.affine
        self.bits = spec.bits
        self.qmax = (1 << spec.bits) - 1 if spec.affine else (1 << (spec.bits - 1)) - 1
        self.gs = group_size
        self.scale_dtype = scale_dtype
        self.search = search

    def params(self, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored (scale, min) ``[N]`` for the group weights ``wg [N, gs]``."""
        if self.affine:
            _, s, m = rtn.rtn_affine(wg, self.bits, wg.shape[1], self.scale_dtype, search=self.search)
            return s[:, 0], m[:, 0]
        _, s = rtn.rtn_symmetric(wg, self.bits, wg.shape[1], self.scale_dtype)
        return s[:, 0], None

    def quant(self, w: torch.Tensor, s: torch.Tensor, m: torch.Tensor | None):
        """Column ``w [N]`` -> (codes [N] float, dequantized [N] float32)."""
        s32 = s.float()
        inv = torch.where(s32 > 0, 1.0 / s32, torch.zeros_like(s32))
        if self.affine:
            m32 = m.float()
            q = torch.round((w - m32) * inv).clamp_(0, self.qmax)
            return q, q * s32 + m32
        q = torch.round(w * inv).clamp_(-self.qmax, self.qmax)
        return q, q * s32


def output_error(w_ref: torch.Tensor, w_q: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative output error ``||X (Wq - W)^T|| / ||X W^T||`` from ``gram = X^T X``."""
    g = gram.to(torch.float64)
    d = (w_q.double() - w_ref.double())
    num = ((d @ g) * d).sum()
    den = ((w_ref.double() @ g) * w_ref.double()).sum()
    return math.sqrt(max(float(num), 0.0) / max(float(den), 1e-300))


@torch.no_grad()
def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, fmt: str, group_size: int | None = 64,
                         damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                         search: bool | None = None, scale_dtype: torch.dtype = torch.float16
                         ) -> tuple[QuantizedWeight, dict[str, float]]:
    """GPTQ-quantize ``weight [N, K]`` given ``hessian [K, K]`` (``2 X^T X / n`` or any positive
    multiple). Returns the packed weight and ``{"loss": GPTQ's sum of (w-q)^2/d^2 / 2}``.

    ``search``: RTN's per-group clipping search for the group parameters (default as
    ``formats.quantize``: on for int3/int2). ``act_order``: see the module docstring.
    """
    if fmt not in GPTQ_FORMATS:
        raise ValueError(f"GPTQ supports {', '.join(GPTQ_FORMATS)}; got {fmt!r} "
                         "(use llmopt.quant.linear.quantize_model for RTN in the other formats)")
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight must be [N, K] and hessian [K, K]; got {tuple(weight.shape)} and "
                         f"{tuple(hessian.shape)}")
    if not 0 <= damp < 1 or block_size < 1:
        raise ValueError(f"need 0 <= damp < 1 and block_size >= 1, got damp={damp}, block_size={block_size}")
    n, k = weight.shape
    gs = effective_group_size(fmt, k, group_size)
    if k % gs:
        raise ValueError(f"{fmt}: in_features={k} is not a multiple of group_size={gs}")
    if search is None:
        search = fmt in ("int3", "int2")
    qz = _GroupQuantizer(fmt, gs, scale_dtype, bool(search))
    dev = weight.device
    W = weight.detach().float().clone()
    H = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    ngroups = k // gs
    scales = torch.zeros(n, ngroups, dtype=scale_dtype, device=dev)
    mins = torch.zeros(n, ngroups, dtype=scale_dtype, device=dev) if qz.affine else None
    perm = None
    if act_order:
        for g in range(ngroups):  # static groups: params from the original weights
            s, m = qz.params(W[:, g * gs:(g + 1) * gs])
            scales[:, g] = s
            if mins is not None:
                mins[:, g] = m
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    d_mean = torch.mean(torch.diag(H))
    idx = torch.arange(k, device=dev)
    H[idx, idx] += damp * d_mean
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError as e:  # not positive definite even after dampening
        raise RuntimeError(f"GPTQ: Cholesky failed ({e}); increase damp (now {damp}) or use more "
                           "calibration tokens") from None
    Hinv = Hinv.float()

    Q = torch.zeros(n, k, dtype=torch.float32, device=dev)
    codes = torch.zeros(n, k, dtype=torch.float32, device=dev)
    losses = torch.zeros(n, dtype=torch.float64, device=dev)
    cur_s = cur_m = None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        cnt = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros(n, cnt, dtype=torch.float32, device=dev)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(cnt):
            c = i1 + i
            if perm is None:
                if c % gs == 0:
                    # group params from the weights as updated so far (pending lazy updates of
                    # columns beyond this block applied on the fly)
                    end = c + gs
                    if end <= i2:
                        wg = W1[:, i:i + gs]
                    else:
                        rest = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:c, i2:end]
                        wg = torch.cat([W1[:, i:], rest], dim=1)
                    cur_s, cur_m = qz.params(wg)
                    scales[:, c // gs] = cur_s
                    if mins is not None:
                        mins[:, c // gs] = cur_m
            else:
                g = int(perm[c]) // gs
                cur_s = scales[:, g]
                cur_m = mins[:, g] if mins is not None else None
            w = W1[:, i]
            d = Hinv1[i, i]
            q, dq = qz.quant(w, cur_s, cur_m)
            codes[:, c] = q
            Q[:, c] = dq
            err = (w - dq) / d
            losses += (err.double() ** 2) / 2
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        if i2 < k:
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
    qcodes = codes.to(torch.int64)
    qw = pack_codes(fmt, qcodes, scales, mins, gs)
    return qw, {"loss": float(losses.sum())}


# --------------------------------------------------------------------------------------------
# model level
# --------------------------------------------------------------------------------------------

def check_model_and_calib(model: nn.Module, calib: Sequence[Sequence[int]]) -> None:
    """Clear errors for an unsupported model or bad calibration sequences."""
    layers = getattr(model, "layers", None)
    if layers is None or not hasattr(model, "embed_tokens") or not all(
            hasattr(l, "self_attn") and hasattr(l.self_attn, "qkv_proj") and hasattr(l, "mlp") for l in layers):
        raise TypeError("expected an llmopt.models.transformer.Transformer (load it with "
                        "llmopt.models.loader.load_model(...).model)")
    if not calib:
        raise ValueError("no calibration sequences: pass calib=calibration_batches(tokenizer)")
    vocab = model.embed_tokens.num_embeddings
    for j, s in enumerate(calib):
        if len(s) < 1:
            raise ValueError(f"calibration sequence {j} is empty")
        if len(s) > model.max_positions:
            raise ValueError(f"calibration sequence {j} has {len(s)} tokens, more than the model's "
                             f"{model.max_positions} positions: use a shorter seq_len")
        if min(s) < 0 or max(s) >= vocab:
            raise ValueError(f"calibration sequence {j} has token ids outside [0, {vocab}): wrong tokenizer?")


def is_target(name: str, mod: nn.Module, skip: Iterable[str]) -> bool:
    return isinstance(mod, nn.Linear) and not any(s in name for s in skip)


def embed_inputs(model: nn.Module, calib: Sequence[Sequence[int]]):
    """Per sequence: (embeddings [T, H], positions [T])."""
    dev = model.embed_tokens.weight.device
    out = []
    for s in calib:
        ids = torch.tensor(list(s), dtype=torch.long, device=dev)
        out.append((model.embed_tokens(ids), torch.arange(len(s), device=dev)))
    return out


def layer_stages(layer: nn.Module, xs: list, residuals: list, positions: list, cos_sin: torch.Tensor,
                 on_inputs: Callable[[str, list], None] | None = None):
    """Run ``DecoderLayer.forward`` (causal, no cache) over many sequences, one linear at a time.

    Before each linear (``self_attn.qkv_proj``, ``self_attn.o_proj``, ``mlp.gate_up_proj``,
    ``mlp.down_proj``) ``on_inputs(relative_name, inputs)`` gets that linear's inputs for every
    sequence and may replace the module (e.g. by its quantized version); the stage then runs with
    whatever module is in place. Returns the layer outputs ``(xs, residuals)``. ``residuals`` of
    ``None`` mean the first layer. The lists are consumed (residuals updated in place).
    """
    cb = on_inputs or (lambda name, inputs: None)
    attn, mlp = layer.self_attn, layer.mlp
    hs = []
    for j, x in enumerate(xs):
        if residuals[j] is None:
            residuals[j] = x
            hs.append(layer.input_layernorm(x))
        else:
            h, residuals[j] = ops.add_rms_norm(x, residuals[j], layer.input_layernorm.weight,
                                               layer.input_layernorm.eps)
            hs.append(h)
    cb("self_attn.qkv_proj", hs)
    outs = [attn.attend(attn.qkv_proj(h), p, cos_sin, None) for h, p in zip(hs, positions)]
    del hs
    cb("self_attn.o_proj", outs)
    hs = []
    for j, a in enumerate(outs):
        h, residuals[j] = ops.add_rms_norm(attn.o_proj(a), residuals[j], layer.post_attention_layernorm.weight,
                                           layer.post_attention_layernorm.eps)
        hs.append(h)
    del outs
    cb("mlp.gate_up_proj", hs)
    ms = [ops.silu_mul(mlp.gate_up_proj(h)) for h in hs]
    del hs
    cb("mlp.down_proj", ms)
    ys = [mlp.down_proj(m) for m in ms]
    return ys, residuals


def gram(inputs: list) -> tuple[torch.Tensor, int]:
    """``(sum of x^T x over all rows of inputs [float64, K x K], number of rows)``."""
    k = inputs[0].shape[-1]
    s = torch.zeros(k, k, dtype=torch.float64, device=inputs[0].device)
    n = 0
    for x in inputs:
        x2 = x.reshape(-1, k).float()
        s += (x2.T @ x2).double()
        n += x2.shape[0]
    return s, n


@torch.no_grad()
def gptq_layer_loop(model: nn.Module, calib: Sequence[Sequence[int]],
                    on_linear: Callable[[str, list], None], progress: Progress | None = None,
                    label: str = "gptq", num_layers: int | None = None) -> None:
    """The sequential GPTQ pass shared by uniform and mixed-precision GPTQ: run the calibration
    sequences through the decoder layer by layer (the first ``num_layers``, default all) and call
    ``on_linear(name, inputs)`` with each linear's inputs as they come, computed with every earlier
    linear already replaced; ``on_linear`` quantizes the module ``name`` (or leaves it)."""
    check_model_and_calib(model, calib)
    with torch.no_grad():
        emb = embed_inputs(model, calib)
        xs = [e for e, _ in emb]
        positions = [p for _, p in emb]
        cos_sin = model.rope_table(xs[0].dtype)
        residuals: list = [None] * len(xs)
        layers = model.layers if num_layers is None else model.layers[:num_layers]
        n_layers = len(layers)
        for li, layer in enumerate(layers):
            def on_inputs(rel: str, inputs: list, prefix: str = f"layers.{li}.") -> None:
                on_linear(prefix + rel, inputs)

            xs, residuals = layer_stages(layer, xs, residuals, positions, cos_sin, on_inputs)
            if progress is not None:
                progress(li + 1, n_layers, f"{label} layer {li}")


def gptq_quantize_model(model: nn.Module, fmt: str, group_size: int = 64, calib: list[list[int]] | None = None,
                        skip=DEFAULT_SKIP, damp: float = 0.01, block_size: int = 128,
                        progress: Progress | None = None, act_order: bool = False,
                        search: bool | None = None, scale_dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """GPTQ-quantize (in place) every decoder ``nn.Linear`` of ``model`` whose qualified name
    contains none of the ``skip`` substrings, replacing it by a :class:`QuantLinear` in ``fmt``.

    ``calib``: token-id sequences (e.g. :func:`llmopt.quant.calib.calibration_batches`). Linears
    that are not ``nn.Linear`` (already quantized) run as they are; linears whose
    ``in_features`` is not a multiple of the group size stay in float (listed in
    ``stats["kept_float"]``). Returns ``{"method", "fmt", "group_size", "seconds", "tokens",
    "layers": {name: {"loss", "rel_err", "rel_err_rtn"}}, "kept_float": [...]}`` where
    ``rel_err`` is the relative output error ``||X(Q-W)^T|| / ||XW^T||`` on the calibration
    inputs of that linear and ``rel_err_rtn`` the same for plain RTN (``formats.quantize``).
    """
    if fmt not in GPTQ_FORMATS:
        raise ValueError(f"GPTQ supports {', '.join(GPTQ_FORMATS)}; got {fmt!r} "
                         "(use llmopt.quant.linear.quantize_model for RTN in the other formats)")
    check_model_and_calib(model, calib)
    skip = tuple(skip or ())
    t0 = time.perf_counter()
    stats: dict[str, Any] = {"method": "gptq", "fmt": fmt, "group_size": group_size,
                             "tokens": sum(len(s) for s in calib), "layers": {}, "kept_float": []}

    def on_linear(name: str, inputs: list) -> None:
        mod = model.get_submodule(name)
        if not is_target(name, mod, skip):
            return
        gs = effective_group_size(fmt, mod.in_features, group_size)
        if mod.in_features % gs:
            log.warning("gptq: keeping %s in float (in_features=%d not a multiple of %d)",
                        name, mod.in_features, gs)
            stats["kept_float"].append(name)
            return
        S, n = gram(inputs)
        H = S * (2.0 / n)
        W = mod.weight.detach().float()
        qw, st = gptq_quantize_weight(W, H, fmt, group_size, damp=damp, block_size=block_size,
                                      act_order=act_order, search=search, scale_dtype=scale_dtype)
        st["rel_err"] = output_error(W, dequantize(qw), S)
        st["rel_err_rtn"] = output_error(W, dequantize(rtn_quantize(W, fmt, group_size, scale_dtype,
                                                                    search=search)), S)
        stats["layers"][name] = st
        bias = mod.bias.detach() if mod.bias is not None else None
        model.set_submodule(name, QuantLinear(qw, bias).to(W.device))

    gptq_layer_loop(model, calib, on_linear, progress, label=f"gptq {fmt}")
    stats["seconds"] = time.perf_counter() - t0
    return stats
