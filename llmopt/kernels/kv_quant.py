"""An 8-bit KV cache: int8 or fp8 (e4m3) codes with one float32 scale per (token, kv head), and the
paged decode attention that reads it without a dequantized copy.

Layout: K and V int8 (or ``torch.float8_e4m3fn``) ``[num_blocks, block_size, Hk, D]``;
``k_scale``/``v_scale`` float32 ``[num_blocks, block_size, Hk]``; ``x ~= code * scale`` with
``scale = max|x| / 127`` (int8, symmetric, round to nearest) or ``max|x| / 448`` (e4m3fn's largest
finite value; torch's float -> e4m3fn rounding) over the head's D values (all-zero rows get scale 0).
At head_dim 64 a token costs 64 + 4 bytes per head and tensor instead of 256 (fp32): 3.76x less, for
either code. int8 spaces its 255 levels evenly; e4m3 spends them logarithmically (3 mantissa bits,
exponents 2^-9..2^8 of the scale), so it keeps small values of a row with an outlier better and the
largest ones worse. Which format a cache uses is its dtype (``EngineConfig(kv_dtype="int8"|"fp8")``).

``paged_decode_attention_int8`` calls the AVX2/FMA/F16C kernel of ``csrc/kv_int8.cpp`` (dequantizes
each 32-token tile once into an L1-sized buffer shared by the query heads of a GQA group, then runs
the float kernel's tile step on it: blocked scores, vectorized exp, register-blocked P @ V) when it built, else its torch twin
``paged_decode_attention_int8_ref`` (which gathers and dequantizes the attended rows: a reference,
not a fast path). Both take either code. ``LLMOPT_NATIVE=0`` forces the reference.
"""

from __future__ import annotations

import torch

from .build import extension_loader, native_enabled
from .ops import paged_decode_attention_ref

__all__ = ["FP8", "KV_CODE_DTYPES", "is_quantized", "quantize_kv", "dequantize_kv", "write_kv_int8",
           "paged_decode_attention_int8", "paged_decode_attention_int8_ref", "native_available"]

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3fn's largest finite value
KV_CODE_DTYPES = (torch.int8, FP8)  # the 8-bit caches: codes plus a float32 scale per (token, kv head)


def is_quantized(dtype: torch.dtype) -> bool:
    """Whether a KV cache of this dtype holds 8-bit codes with scales (int8 or fp8)."""
    return dtype in KV_CODE_DTYPES

_native = extension_loader("llmopt_kv", ["kv_int8.cpp"])


def native_available() -> bool:
    return native_enabled() and _native() is not None


def quantize_kv(x: torch.Tensor, dtype: torch.dtype = torch.int8) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [..., D] float -> (codes [..., D] of ``dtype``: int8 or fp8, float32 scale [...])."""
    if dtype not in KV_CODE_DTYPES:
        raise ValueError(f"KV codes are int8 or float8_e4m3fn, got {dtype}")
    top = 127.0 if dtype == torch.int8 else FP8_MAX
    xf = x.float()
    scale = xf.abs().amax(-1) / top
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    y = xf * inv[..., None]
    if dtype == torch.int8:
        return torch.round(y).clamp_(-127, 127).to(torch.int8), scale
    return y.clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale[..., None]).to(dtype)


def write_kv_int8(cache: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """Quantize ``x`` [T, Hk, D] into the 8-bit ``cache`` [NB, BS, Hk, D] (int8 or fp8: its dtype) /
    ``scales`` [NB, BS, Hk] at flat ``slots`` [T] (block * block_size + offset)."""
    q, s = quantize_kv(x, cache.dtype)
    raw = torch.int8 if cache.dtype == torch.int8 else torch.uint8  # torch has no index_copy_ for float8
    cache.view(raw).view(-1, *cache.shape[2:]).index_copy_(0, slots, q.view(raw))
    scales.view(-1, scales.shape[-1]).index_copy_(0, slots, s)


def paged_decode_attention_int8_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                    k_scale: torch.Tensor, v_scale: torch.Tensor, block_tables: torch.Tensor,
                                    context_lens: torch.Tensor, scale: float,
                                    sliding_window: int | None = None) -> torch.Tensor:
    """The float reference on the dequantized cache (see ``ops.paged_decode_attention_ref``)."""
    k = dequantize_kv(k_cache, k_scale, q.dtype)
    v = dequantize_kv(v_cache, v_scale, q.dtype)
    return paged_decode_attention_ref(q, k, v, block_tables, context_lens, scale, sliding_window)


def paged_decode_attention_int8(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                k_scale: torch.Tensor, v_scale: torch.Tensor, block_tables: torch.Tensor,
                                context_lens: torch.Tensor, scale: float,
                                sliding_window: int | None = None) -> torch.Tensor:
    """One query token per sequence [B, Hq, D] against the 8-bit (int8 or fp8) paged cache -> [B, Hq, D]."""
    if sliding_window is not None and int(sliding_window) <= 0:
        raise ValueError(f"sliding_window must be None or a positive int, got {sliding_window!r}")
    ext = _native() if native_enabled() else None
    if (ext is not None and q.device.type == "cpu" and q.dtype == torch.float32 and not q.requires_grad
            and q.dim() == 3 and k_cache.is_contiguous() and v_cache.is_contiguous()
            and k_scale.is_contiguous() and v_scale.is_contiguous()):
        return ext.paged_decode_attention_int8(
            q.contiguous(), k_cache, v_cache, k_scale, v_scale, block_tables.to(torch.int32).contiguous(),
            context_lens.to(torch.int32).contiguous(), float(scale),
            -1 if sliding_window is None else int(sliding_window))
    return _gathered_ref(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, scale, sliding_window)


def _gathered_ref(q, k_cache, v_cache, k_scale, v_scale, block_tables, context_lens, scale, sliding_window):
    """The reference restricted to the blocks the batch uses (dequantizing the whole cache for every
    step would cost the cache's size per token)."""
    used = torch.unique(block_tables.long().flatten())
    remap = torch.zeros(k_cache.shape[0], dtype=torch.long)
    remap[used] = torch.arange(len(used))
    return paged_decode_attention_int8_ref(q, k_cache[used], v_cache[used], k_scale[used], v_scale[used],
                                           remap[block_tables.long()], context_lens, scale, sliding_window)
