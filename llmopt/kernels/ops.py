"""Fused inference ops with a native CPU kernel and a plain-torch reference each.

Every public op calls the AVX2/FMA + OpenMP kernel from ``csrc/fused.cpp`` when the extension
built (it is compiled lazily on the first call, see :mod:`llmopt.kernels.build`) and the inputs are
CPU float32 with autograd not recording them; otherwise it calls its ``*_ref`` twin. The
references are device-agnostic torch (CUDA works), run in the inputs' dtype and compute the
norms in float32 like Hugging Face, so they also document the exact semantics.

``LLMOPT_NATIVE=0`` in the environment forces the references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .build import extension_loader

__all__ = [
    "native_available",
    "rms_norm",
    "rms_norm_ref",
    "add_rms_norm",
    "add_rms_norm_ref",
    "silu_mul",
    "silu_mul_ref",
    "rope_",
    "rope_ref_",
    "paged_decode_attention",
    "paged_decode_attention_ref",
]

# the compiled extension module, or None (built / looked up once, on first use)
_native = extension_loader("llmopt_fused", ["fused.cpp"])


def native_available() -> bool:
    """True when the native kernels built and will be used for CPU float32 inputs."""
    return _native() is not None


def _cpu_of(dtypes: tuple[torch.dtype, ...], *tensors: torch.Tensor) -> bool:
    """Every tensor on the CPU with a dtype in ``dtypes`` (and none requiring grad while grad is on)."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in dtypes or (grad and t.requires_grad):
            return False
    return True


def _f32cpu(*tensors: torch.Tensor) -> bool:
    return _cpu_of((torch.float32,), *tensors)


def _idx_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


# --------------------------------------------------------------------------------------------
# 1. RMSNorm
# --------------------------------------------------------------------------------------------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: ``weight * (x.float() * rsqrt(mean(x^2, -1) + eps)).to(x.dtype)``."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (any leading shape); see :func:`rms_norm_ref`."""
    ext = _native()
    if ext is not None and _f32cpu(x, weight) and x.dim() >= 1 and weight.dim() == 1:
        return ext.rms_norm(x.contiguous(), weight.contiguous(), float(eps))
    return rms_norm_ref(x, weight, eps)


# --------------------------------------------------------------------------------------------
# 2. residual add + RMSNorm
# --------------------------------------------------------------------------------------------


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``summed = residual + x``; returns ``(rms_norm(summed), summed)``.

    Same in-place contract as :func:`add_rms_norm`: ``residual`` is overwritten with the sum and
    returned as ``summed``, unless autograd is recording (then a new tensor is returned and
    ``residual`` is left alone, so the backward graph stays valid).
    """
    if torch.is_grad_enabled() and (x.requires_grad or residual.requires_grad):
        summed = residual + x
    else:
        summed = residual.add_(x)
    return rms_norm_ref(summed, weight, eps), summed


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused pre-norm residual step of a decoder layer: returns ``(rms_norm(residual + x), residual + x)``.

    IN PLACE: ``residual`` is overwritten with ``residual + x`` and the returned ``summed`` *is*
    ``residual`` (both paths, except when autograd is recording, see :func:`add_rms_norm_ref`).
    Always use the returned ``summed``; never rely on the old value of ``residual``. ``x`` is not
    modified. The native kernel does the add, the store of the sum and the sum of squares in one
    pass over the row and normalizes from L1 in a second.
    """
    ext = _native()
    if (
        ext is not None
        and _f32cpu(x, residual, weight)
        and residual.is_contiguous()
        and x.shape == residual.shape
        and x.dim() >= 1
        and weight.dim() == 1
    ):
        normed = ext.add_rms_norm_(x.contiguous(), residual, weight.contiguous(), float(eps))
        return normed, residual
    return add_rms_norm_ref(x, residual, weight, eps)


# --------------------------------------------------------------------------------------------
# 3. SiLU * up (SwiGLU)
# --------------------------------------------------------------------------------------------


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """``gate_up = [gate | up]`` along the last dim (2*I) -> ``silu(gate) * up`` of width I."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation on a fused gate/up projection output; see :func:`silu_mul_ref`."""
    ext = _native()
    if ext is not None and _f32cpu(gate_up) and gate_up.dim() >= 1 and gate_up.shape[-1] % 2 == 0:
        return ext.silu_mul(gate_up.contiguous())
    return silu_mul_ref(gate_up)


# --------------------------------------------------------------------------------------------
# 4. Rotary position embedding (NeoX / HF rotate_half), in place
# --------------------------------------------------------------------------------------------


def rope_ref_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """In place on ``q`` [T, Hq, D] and ``k`` [T, Hk, D] (views are fine).

    ``cos = cos_sin_cache[positions, :D/2]``, ``sin = cos_sin_cache[positions, D/2:]``;
    with ``x1, x2 = x[..., :D/2], x[..., D/2:]``: ``x1 <- x1*cos - x2*sin``, ``x2 <- x2*cos + x1*sin``
    (identical to HF ``x*cos + rotate_half(x)*sin`` with cos/sin cast to ``x.dtype``).
    """
    half = q.shape[-1] // 2
    cs = cos_sin_cache.index_select(0, positions.reshape(-1).to(device=cos_sin_cache.device, dtype=torch.long))
    cs = cs.to(q.device)
    for x in (q, k):
        cos = cs[:, None, :half].to(x.dtype)
        sin = cs[:, None, half:].to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        x.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))


rope__ref = rope_ref_  # the mechanical "<op>_ref" spelling of the twin of rope_


def rope_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Apply rotary embeddings to ``q`` and ``k`` in place; see :func:`rope_ref_`.

    ``q``/``k`` may be non-contiguous views (e.g. slices of one fused qkv output
    ``[T, (Hq + 2*Hk) * D]`` viewed as ``[T, H, D]``) as long as the last dim has stride 1.
    ``positions`` is int64 [T]; ``cos_sin_cache`` is float32 [max_pos, D].
    """
    ext = _native()
    if (
        ext is not None
        and _f32cpu(q, k, cos_sin_cache)
        and _idx_cpu(positions)
        and q.dim() == 3
        and k.dim() == 3
        and q.stride(-1) == 1
        and k.stride(-1) == 1
    ):
        ext.rope_(q, k, positions.reshape(-1).to(torch.int64).contiguous(), cos_sin_cache.contiguous())
        return None
    rope_ref_(q, k, positions, cos_sin_cache)
    return None


# --------------------------------------------------------------------------------------------
# 5. Paged decode attention
# --------------------------------------------------------------------------------------------


def _check_window(sliding_window: int | None) -> None:
    if sliding_window is not None and int(sliding_window) <= 0:
        raise ValueError(f"sliding_window must be None or a positive int, got {sliding_window!r}")


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One query token per sequence against a paged KV cache.

    q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hk, D]; block_tables int [B, max_blocks]
    (token t of sequence b is at ``cache[block_tables[b, t // block_size], t % block_size]``);
    context_lens int [B] (cached tokens incl. the current one). Query head h uses kv head
    ``h // (Hq // Hk)``. With ``sliding_window`` only the last ``sliding_window`` tokens are
    attended. Sequences with no tokens get zeros. Gathers K/V, then HF eager attention
    (scores in q.dtype, softmax in float32). Returns [B, Hq, D].
    """
    _check_window(sliding_window)
    B, Hq, D = q.shape
    _, BS, Hk, _ = k_cache.shape
    G = Hq // Hk
    dev = q.device
    lens = context_lens.to(device=dev, dtype=torch.long)
    max_len = int(lens.max()) if B else 0
    if max_len == 0:
        return q.new_zeros(B, Hq, D)
    t = torch.arange(max_len, device=dev)
    valid = t[None, :] < lens[:, None]  # [B, L]
    if sliding_window is not None:
        valid &= t[None, :] >= (lens - int(sliding_window))[:, None]
    blocks = block_tables.to(device=dev, dtype=torch.long)[:, t // BS]  # [B, L]
    blocks = torch.where(valid, blocks, torch.zeros_like(blocks))  # padding entries may be garbage
    slots = (t % BS).expand(B, -1)
    k = k_cache[blocks, slots].permute(0, 2, 1, 3).to(q.dtype)  # [B, Hk, L, D] (a float16 cache: widened)
    v = v_cache[blocks, slots].permute(0, 2, 1, 3).to(q.dtype)
    scores = torch.matmul(q.reshape(B, Hk, G, D), k.transpose(-1, -2)) * scale  # [B, Hk, G, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).nan_to_num(0.0).to(q.dtype)
    return torch.matmul(probs, v).reshape(B, Hq, D)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Flash-decoding over a paged KV cache for all sequences at once; see :func:`paged_decode_attention_ref`.

    Native: OpenMP over (sequence, kv head) pairs (the query heads of a GQA group share each K/V
    read), online softmax per 32-token tile, token range split across threads when there are
    fewer pairs than threads and contexts are long.
    """
    _check_window(sliding_window)
    ext = _native()
    if (
        ext is not None
        and _f32cpu(q)
        # a float32 cache, or a float16 one (converted per tile)
        and _cpu_of((torch.float32, torch.float16), k_cache, v_cache)
        and k_cache.dtype == v_cache.dtype
        and _idx_cpu(block_tables, context_lens)
        and q.dim() == 3
        and k_cache.dim() == 4
        and k_cache.stride(-1) == 1
        and v_cache.stride(-1) == 1
    ):
        return ext.paged_decode_attention(
            q.contiguous(),
            k_cache,
            v_cache,
            block_tables.to(torch.int32).contiguous(),
            context_lens.to(torch.int32).contiguous(),
            float(scale),
            -1 if sliding_window is None else int(sliding_window),
            0,
        )
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window)
