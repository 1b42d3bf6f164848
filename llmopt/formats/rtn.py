"""Round-to-nearest (RTN) quantization primitives.

Every function takes a float weight ``w`` of shape ``[N, K]`` (N output features, K input
features), works per row-group of ``group_size`` consecutive input features, and returns the
integer / low-precision *codes* in natural ``[N, K]`` order plus the per-group parameters.
Packing into the kernel layouts lives in :mod:`llmopt.formats.layouts`.

All functions are plain device-agnostic torch (no numpy, no Python loops over elements). The
scales/mins are rounded to their *storage* dtype before the codes are computed, so the codes
are optimal for the parameters actually stored (llama.cpp does the same).
"""

from __future__ import annotations

import torch

__all__ = [
    "group_view",
    "rtn_affine",
    "rtn_symmetric",
    "rtn_fp8_e4m3",
    "rtn_mxfp4",
    "FP8_E4M3_MAX",
    "E2M1_VALUES",
    "quantize_activations_int8",
    "quantize_activations_int8_grouped",
]

FP8_E4M3_MAX = 448.0
# magnitudes of the 8 non-negative e2m1 codes (bit 3 of a 4-bit code is the sign)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[N, K]`` -> ``[N, K // group_size, group_size]`` (K must be a multiple)."""
    n, k = w.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"in_features={k} is not a multiple of group_size={group_size}")
    return w.reshape(n, k // group_size, group_size)


# range-shrink factors tried by ``rtn_affine(search=True)`` (independently for min and max)
SEARCH_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6)


def _affine_params(lo, hi, qmax, scale_dtype):
    scale = ((hi - lo) / qmax).to(scale_dtype)
    mn = lo.to(scale_dtype)
    return scale, mn


def _affine_codes(g, scale, mn, qmax):
    s32 = scale.float()
    m32 = mn.float()
    inv = torch.where(s32 > 0, 1.0 / s32, torch.zeros_like(s32))
    return torch.round((g - m32.unsqueeze(-1)) * inv.unsqueeze(-1)).clamp_(0, qmax)


def rtn_affine(w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16,
               search: bool = False, grid=SEARCH_GRID):
    """Asymmetric RTN: ``w ~= q * scale + min`` with ``q`` in ``[0, 2**bits - 1]``.

    Returns ``(q uint8 [N, K], scale [N, G], min [N, G])`` with ``G = K // group_size``;
    scale/min in ``scale_dtype`` (fp16 or fp32). By default ``min`` is the group minimum and
    ``scale = (max - min) / (2**bits - 1)`` (ggml Q4_1 style). With ``search=True`` the group range
    ``[min*a, max*b]`` is chosen per group among ``a, b in grid`` to minimise the squared error of
    the rounded weights (clipping search, like llama.cpp's make_qkx quants; still round-to-nearest
    codes). It costs ``len(grid)**2`` RTN passes and helps most at 2-3 bits (see tests).
    """
    qmax = (1 << bits) - 1
    g = group_view(w.float(), group_size)
    lo = g.amin(dim=-1)
    hi = g.amax(dim=-1)
    scale, mn = _affine_params(lo, hi, qmax, scale_dtype)
    q = _affine_codes(g, scale, mn, qmax)
    if search:
        def sq_err(q, scale, mn):
            d = q * scale.float().unsqueeze(-1) + mn.float().unsqueeze(-1)
            return (d - g).pow_(2).sum(dim=-1)

        best = sq_err(q, scale, mn)
        for a in grid:
            for b in grid:
                if a == 1.0 and b == 1.0:
                    continue
                s_c, m_c = _affine_params(lo * a, hi * b, qmax, scale_dtype)
                q_c = _affine_codes(g, s_c, m_c, qmax)
                e = sq_err(q_c, s_c, m_c)
                better = e < best
                best = torch.where(better, e, best)
                scale = torch.where(better, s_c, scale)
                mn = torch.where(better, m_c, mn)
                q = torch.where(better.unsqueeze(-1), q_c, q)
    return q.to(torch.uint8).reshape(w.shape), scale, mn


def rtn_symmetric(w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16):
    """Symmetric RTN: ``w ~= q * scale``, ``q`` in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``.

    Returns ``(q int8 [N, K], scale [N, G])``. ``group_size == K`` gives per-channel scales.
    """
    qmax = (1 << (bits - 1)) - 1
    g = group_view(w.float(), group_size)
    amax = g.abs().amax(dim=-1)
    scale = (amax / qmax).to(scale_dtype)
    s32 = scale.float()
    inv = torch.where(s32 > 0, 1.0 / s32, torch.zeros_like(s32))
    q = torch.round(g * inv.unsqueeze(-1)).clamp_(-qmax, qmax)
    return q.to(torch.int8).reshape(w.shape), scale


def rtn_fp8_e4m3(w: torch.Tensor):
    """Per-output-channel fp8 e4m3 (``float8_e4m3fn``): ``w ~= fp8(w / scale) * scale``.

    ``scale = amax(row) / 448`` (fp32). Returns ``(codes uint8 [N, K], scale fp32 [N])``; codes
    are the raw e4m3fn bit patterns (sign | 4-bit exponent, bias 7 | 3-bit mantissa), never NaN.
    """
    w = w.float()
    amax = w.abs().amax(dim=-1)
    scale = amax / FP8_E4M3_MAX
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    v = (w * inv.unsqueeze(-1)).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    codes = v.to(torch.float8_e4m3fn).view(torch.uint8)
    return codes, scale


def _e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (already divided by the block scale, |v| <= 6) to the nearest e2m1 code
    (ties to the even mantissa, as the OCP MX spec asks). Returns uint8 codes in [0, 15]."""
    a = v.abs()
    # midpoints between consecutive magnitudes 0 .5 1 1.5 2 3 4 6
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=v.device, dtype=v.dtype)
    idx = torch.bucketize(a, mids)  # a == mid -> lower index (right=False)
    # ties: bucketize(right=False) puts a value equal to a midpoint in the lower bucket; move it
    # up when the upper code has the even mantissa (codes 2,4,6 have mantissa bit 0)
    tie = (idx < 7) & (a == mids[idx.clamp(max=6)])
    up_even = ((idx + 1) % 2 == 0)
    idx = torch.where(tie & up_even, idx + 1, idx)
    sign = (v < 0) & (idx > 0)
    return (idx + sign.to(idx.dtype) * 8).to(torch.uint8)


def rtn_mxfp4(w: torch.Tensor, group_size: int = 32):
    """MXFP4: e2m1 elements with one shared power-of-two scale (E8M0) per ``group_size``.

    The shared exponent is ``ceil(log2(amax / 6))`` so the largest element maps to at most 6
    (no clipping; the OCP reference ``floor(log2(amax)) - 2`` clips up to 25% of the top
    binade). Returns ``(codes uint8 [N, K] in [0, 16), exps uint8 [N, G])`` with
    ``scale = 2 ** (exps - 127)``.
    """
    g = group_view(w.float(), group_size)
    amax = g.abs().amax(dim=-1)
    e = torch.ceil(torch.log2(amax.clamp_min(1e-30) / 6.0))
    e = e.clamp_(-126, 127)
    scale = torch.exp2(e)
    codes = _e2m1_encode(g / scale.unsqueeze(-1))
    return codes.reshape(w.shape), (e + 127).to(torch.uint8)


def quantize_activations_int8(x: torch.Tensor):
    """Dynamic per-token symmetric int8: ``x ~= xq * sx``, ``xq`` in [-127, 127].

    Exactly what the native W8A8 kernel does: ``inv = 127 / amax``; ``xq = round_half_even(x*inv)``;
    ``sx = amax / 127``. Returns ``(xq int8 [..., K], sx fp32 [..., 1])``.
    """
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(x * inv).clamp_(-127, 127).to(torch.int8)
    return xq, amax / 127.0


def quantize_activations_int8_grouped(x: torch.Tensor, group_size: int):
    """Dynamic symmetric int8 per group of ``group_size`` features of every token (w4a8).

    Same rounding as the native kernel: ``inv = 127 / amax``; ``xq = round_half_even(x * inv)``;
    ``sx = amax / 127`` per group. ``x [..., K]`` with ``K % group_size == 0``. Returns
    ``(xq int8 [..., K], sx fp32 [..., K // group_size])``.
    """
    x = x.float()
    k = x.shape[-1]
    g = x.reshape(*x.shape[:-1], k // group_size, group_size)
    amax = g.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(g * inv).clamp_(-127, 127).to(torch.int8).reshape(x.shape)
    return xq, (amax / 127.0).squeeze(-1)
