"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization"), after llm-awq's
``auto_scale`` / ``auto_clip``, for our :class:`~llmopt.models.transformer.Transformer`.

Per decoder layer, from the float model's activations on the calibration set:

1. **Scales.** For a group of linears that read the same input ``x`` (``K`` channels) the
   weight columns are multiplied by ``s = mean|x|**alpha`` (normalised by
   ``sqrt(max(s) * min(s))``) and ``1/s`` is folded into whatever produces ``x``, so the float
   output is unchanged but salient input channels get finer quantization steps. ``alpha`` is
   grid-searched over 20 points in ``[0, 1]`` (``alpha = 0`` is plain RTN) to minimise the
   group's output error ``||X (Q(W s)/s - W)^T||^2``, evaluated exactly from the Gram matrix
   ``X^T X`` (no forward per grid point). The groups, all of them exact folds:

   ========================  ===============================  ==================================
   consumer                  ``1/s`` folded into               note
   ========================  ===============================  ==================================
   ``qkv_proj``              ``input_layernorm.weight``        the norm's only consumer
   ``gate_up_proj``          ``post_attention_layernorm``      the norm's only consumer
   ``o_proj``                the v rows of ``qkv_proj``        GQA: one scale per kv-head channel,
                                                               shared by the q heads reading it
                                                               (o input ``h*D+d`` = v channel
                                                               ``(h // (Hq/Hk))*D + d``)
   ``down_proj``             the up rows of ``gate_up_proj``   ``silu(g) * (u/s)`` = ``(silu(g)*u)/s``
   ========================  ===============================  ==================================

   ``o_proj`` / ``down_proj`` are scaled only while the producing ``qkv_proj`` / ``gate_up_proj``
   is still an ``nn.Linear`` (a float weight we can change); otherwise they are skipped (listed in
   ``stats["unscaled"]``). A v bias is divided by ``s`` too.
2. **Clipping** (``clip=True``): per output row and group the quantization range ``[lo, hi]`` is
   shrunk to ``[c*lo, c*hi]``, ``c`` in ``1.0, 0.95 .. 0.5``, keeping the ``c`` with the least
   group output error ``dw G_g dw^T`` (``G_g`` = the group's block of ``X^T X``). As in llm-awq
   the q and k rows are not clipped (their error goes through the q.k product, which this
   per-row loss does not model). Not used for int8.
3. RTN into the format with :func:`llmopt.formats.layouts.quantize` (after clipping the clipping
   search of RTN itself is off).

Layers are processed in order with the *float* outputs of the previous layer as inputs (as
llm-awq does; the scaling leaves them unchanged).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from torch import nn

from llmopt.formats import rtn
from llmopt.formats.layouts import FORMATS, dequantize, effective_group_size
from llmopt.formats.layouts import quantize as rtn_quantize

from .gptq import Progress, check_model_and_calib, embed_inputs, is_target, output_error
from .linear import DEFAULT_SKIP, QuantLinear

log = logging.getLogger(__name__)

__all__ = ["AWQ_FORMATS", "awq_quantize_model", "awq_scale_model", "fake_quantize"]

AWQ_FORMATS = ("int4", "int3", "int2", "int8", "w4a8")
N_GRID = 20
CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 .. 0.5


def fake_quantize(w: torch.Tensor, fmt: str, group_size: int, search: bool = False,
                  scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """RTN quantize + dequantize ``w [N, K]`` with the format's rules (fp32 result)."""
    spec = FORMATS[fmt]
    n, k = w.shape
    gs = effective_group_size(fmt, k, group_size)
    if spec.affine:
        q, s, m = rtn.rtn_affine(w, spec.bits, gs, scale_dtype, search=search)
        return (q.float().reshape(n, k // gs, gs) * s.float().unsqueeze(-1) + m.float().unsqueeze(-1)).reshape(n, k)
    q, s = rtn.rtn_symmetric(w, spec.bits, gs, scale_dtype)
    return (q.float().reshape(n, k // gs, gs) * s.float().unsqueeze(-1)).reshape(n, k)


class _Stats:
    """Per-linear input statistics: Gram ``sum x^T x`` (float64), ``sum |x|`` and token count."""

    def __init__(self, k: int, device):
        self.S = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()
        self.S += (x2.T @ x2).double()
        self.abs_sum += x2.abs().sum(0).double()
        self.n += x2.shape[0]


def _search_scales(W: torch.Tensor, S: torch.Tensor, xmean: torch.Tensor, fmt: str, gs: int,
                   expand=None, grid=None) -> tuple[torch.Tensor, float, float, float]:
    """Grid search of ``alpha`` (default 20 points in [0, 1]); returns (s [K], best alpha,
    best err, err of plain RTN = alpha 0).

    ``xmean`` may be shorter than K when ``expand`` maps it to the K columns (tied GQA scales).
    """
    Sf = S.float()
    grid = tuple(grid) if grid is not None else tuple(i / (N_GRID - 1) for i in range(N_GRID))

    def err_of(sk):
        dW = fake_quantize(W * sk, fmt, gs) / sk - W
        return float(((dW @ Sf) * dW).sum())

    err0 = err_of(torch.ones(W.shape[1], dtype=torch.float32, device=W.device))
    best = (None, 0.0, math.inf)
    for alpha in grid:
        s = xmean.float().clamp(min=1e-4).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        sk = expand(s) if expand is not None else s
        err = err0 if alpha == 0 else err_of(sk)
        if err < best[2]:
            best = (sk, alpha, err)
    return best[0], best[1], best[2], err0


def _clip(W: torch.Tensor, S: torch.Tensor, fmt: str, gs: int, rows: slice | None = None) -> torch.Tensor:
    """Per (row, group) range shrink minimising the group output error; returns the clipped W."""
    n, k = W.shape
    G = k // gs
    blocks = torch.stack([S[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(G)]).float()  # [G, gs, gs]
    Wr = W if rows is None else W[rows]
    wg = Wr.reshape(-1, G, gs)
    lo = wg.amin(-1, keepdim=True)
    hi = wg.amax(-1, keepdim=True)
    best_w = wg.clone()
    best_err = None
    for c in CLIP_GRID:
        wc = torch.minimum(torch.maximum(wg, lo * c), hi * c)
        dq = fake_quantize(wc.reshape(-1, k), fmt, gs).reshape(wg.shape)
        d = dq - wg
        err = torch.einsum("ngk,gkl,ngl->ng", d, blocks, d)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_w = torch.where(better.unsqueeze(-1), wc, best_w)
    out = W.clone()
    if rows is None:
        return best_w.reshape(n, k)
    out[rows] = best_w.reshape(-1, k)
    return out


@torch.no_grad()
def _awq(model: nn.Module, fmt: str, group_size: int, calib, skip, progress: Progress | None,
         quantize: bool, clip: bool, alpha_grid=None,
         scale_dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    if fmt not in AWQ_FORMATS:
        raise ValueError(f"AWQ supports {', '.join(AWQ_FORMATS)}; got {fmt!r} "
                         "(use llmopt.quant.linear.quantize_model for RTN in the other formats)")
    check_model_and_calib(model, calib)
    skip = tuple(skip or ())
    clip = clip and fmt != "int8" and quantize
    t0 = time.perf_counter()
    stats: dict[str, Any] = {"method": "awq", "fmt": fmt, "group_size": group_size, "clip": clip,
                             "tokens": sum(len(s) for s in calib), "layers": {}, "unscaled": [],
                             "kept_float": []}
    emb = embed_inputs(model, calib)
    xs = [e for e, _ in emb]
    positions = [p for _, p in emb]
    residuals: list = [None] * len(xs)
    cos_sin = model.rope_table(xs[0].dtype)
    n_layers = len(model.layers)
    for li, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        names = {"qkv": f"layers.{li}.self_attn.qkv_proj", "o": f"layers.{li}.self_attn.o_proj",
                 "gate_up": f"layers.{li}.mlp.gate_up_proj", "down": f"layers.{li}.mlp.down_proj"}
        mods = {key: model.get_submodule(n) for key, n in names.items()}
        targets = {}
        for key, n in names.items():
            m = mods[key]
            if not is_target(n, m, skip):
                continue
            gs = effective_group_size(fmt, m.in_features, group_size)
            if m.in_features % gs:
                log.warning("awq: keeping %s in float (in_features=%d not a multiple of %d)", n, m.in_features, gs)
                stats["kept_float"].append(n)
                continue
            targets[key] = gs
        # 1. float forward of the layer, collecting input statistics of the targets
        st = {key: _Stats(mods[key].in_features, mods[key].weight.device) for key in targets}
        hooks = [mods[key].register_forward_pre_hook(lambda mod, args, s=st[key]: s.add(args[0]))
                 for key in targets]
        try:
            new_xs = []
            for j, x in enumerate(xs):
                y, residuals[j] = layer(x, residuals[j], positions[j], cos_sin, None)
                new_xs.append(y)
        finally:
            for h in hooks:
                h.remove()
        xs = new_xs

        # 2. scales (order: o and down first, so the qkv / gate_up searches see their final rows)
        q_size, kv_size = attn.q_size, attn.kv_size
        group = attn.num_heads // attn.num_kv_heads
        D = attn.head_dim
        for key in ("o", "down", "qkv", "gate_up"):
            if key not in targets:
                continue
            m, s_ = mods[key], st[key]
            W = m.weight.detach().float()
            xmean = s_.abs_sum / max(s_.n, 1)
            expand = None
            if key == "o":
                prod = mods["qkv"]
                if not isinstance(prod, nn.Linear):
                    stats["unscaled"].append(names[key])
                    continue
                # tie the scale of q heads that read the same kv head: mean over the group
                xmean = xmean.reshape(attn.num_kv_heads, group, D).mean(1).reshape(-1)

                def expand(s, group=group, D=D, hk=attn.num_kv_heads):
                    return s.reshape(hk, 1, D).expand(hk, group, D).reshape(-1)
            elif key == "down":
                prod = mods["gate_up"]
                if not isinstance(prod, nn.Linear):
                    stats["unscaled"].append(names[key])
                    continue
            sk, alpha, err, err0 = _search_scales(W, s_.S, xmean, fmt, targets[key], expand, alpha_grid)
            ssmall = sk if expand is None else sk.reshape(attn.num_kv_heads, group, D)[:, 0].reshape(-1)
            # fold: consumer columns * s, producer / s
            m.weight.mul_(sk.to(m.weight.dtype).unsqueeze(0))
            if key == "qkv":
                layer.input_layernorm.weight.div_(sk.to(layer.input_layernorm.weight.dtype))
            elif key == "gate_up":
                layer.post_attention_layernorm.weight.div_(sk.to(layer.post_attention_layernorm.weight.dtype))
            elif key == "o":
                v0 = q_size + kv_size
                prod.weight[v0:v0 + kv_size].div_(ssmall.to(prod.weight.dtype).unsqueeze(1))
                if prod.bias is not None:
                    prod.bias[v0:v0 + kv_size].div_(ssmall.to(prod.bias.dtype))
            else:  # down: up rows of gate_up
                inter = mlp.down_proj.in_features
                prod.weight[inter:2 * inter].div_(sk.to(prod.weight.dtype).unsqueeze(1))
                if prod.bias is not None:
                    prod.bias[inter:2 * inter].div_(sk.to(prod.bias.dtype))
            # statistics of the scaled input x / s
            s_.S.div_(sk.double().unsqueeze(0) * sk.double().unsqueeze(1))
            stats["layers"][names[key]] = {"alpha": alpha, "err_ratio_vs_rtn": err / err0 if err0 > 0 else 1.0}

        # 3. clip + quantize
        if quantize:
            for key, gs in targets.items():
                m = mods[key]
                W = m.weight.detach().float()
                S = st[key].S
                if clip:
                    rows = slice(q_size + kv_size, q_size + 2 * kv_size) if key == "qkv" else None
                    Wc = _clip(W, S, fmt, gs, rows)
                    qw = rtn_quantize(Wc, fmt, group_size, scale_dtype, search=False)
                else:
                    qw = rtn_quantize(W, fmt, group_size, scale_dtype)
                d = stats["layers"].setdefault(names[key], {})
                d["rel_err"] = output_error(W, dequantize(qw), S)
                bias = m.bias.detach() if m.bias is not None else None
                model.set_submodule(names[key], QuantLinear(qw, bias).to(W.device))
        if progress is not None:
            progress(li + 1, n_layers, f"awq {fmt} layer {li}")
    stats["seconds"] = time.perf_counter() - t0
    return stats


def awq_scale_model(model: nn.Module, fmt: str, group_size: int = 64, calib: list[list[int]] | None = None,
                    skip=DEFAULT_SKIP, progress: Progress | None = None, alpha_grid=None) -> dict[str, Any]:
    """Only the AWQ scaling (searched for ``fmt``), in place and in float: the model's output is
    unchanged up to rounding. Returns the per-linear ``alpha`` chosen. ``alpha_grid``: the
    alphas to try (default 20 points in [0, 1]; ``(1.0,)`` forces full scaling, for tests)."""
    return _awq(model, fmt, group_size, calib, skip, progress, quantize=False, clip=False, alpha_grid=alpha_grid)


def awq_quantize_model(model: nn.Module, fmt: str, group_size: int = 64, calib: list[list[int]] | None = None,
                       skip=DEFAULT_SKIP, progress: Progress | None = None, clip: bool = True,
                       alpha_grid=None, scale_dtype: torch.dtype = torch.float16) -> dict[str, Any]:
    """AWQ-quantize (in place) every decoder ``nn.Linear`` whose qualified name contains none of
    the ``skip`` substrings into ``fmt`` (int4, int3, int2, int8, w4a8) :class:`QuantLinear`.

    Returns ``{"method", "fmt", "group_size", "clip", "seconds", "tokens", "layers": {name:
    {"alpha", "err_ratio_vs_rtn", "rel_err"}}, "unscaled": [...], "kept_float": [...]}``;
    ``err_ratio_vs_rtn`` is the searched scale's output error over plain RTN's (before clipping),
    ``rel_err`` the final relative output error on the calibration inputs.
    """
    return _awq(model, fmt, group_size, calib, skip, progress, quantize=True, clip=clip, alpha_grid=alpha_grid,
                scale_dtype=scale_dtype)
