"""Fast, exact dequantization of GGUF (ggml) tensors with vectorized torch ops.

Block layouts follow llama.cpp (``ggml/src/ggml-common.h`` and the
``dequantize_row_*`` reference functions in ``ggml/src/ggml-quants.c``); results
are bit-identical to ``gguf.quants.dequantize`` (the numpy reference shipped with
llama.cpp's ``gguf`` python package) because every value is computed with the
same float32 operations in the same order.

Shape convention
----------------
GGUF stores dimensions in ggml order: ``ne[0]`` first, and ``ne[0]`` is the
innermost (contiguous) dimension.  ``gguf.GGUFReader`` reports that order in
``ReaderTensor.shape``.  Everything in this module takes and returns *torch*
(row-major, HF) shapes, i.e. ``tuple(reversed(ggml_shape))``: the last torch
dimension is ``ne[0]`` and quantization blocks run along it.  A HF ``Linear``
weight ``[out_features, in_features]`` is stored in GGUF as
``ne = [in_features, out_features]``.

Implementation
--------------
The raw block bytes are wrapped without copying as a ``[n_blocks, type_size]``
uint8 tensor.  Fields are sliced out per block, fp16 scales are reinterpreted
with ``.view(torch.float16)``, bits are unpacked with shifts and masks, and the
float32 result is written straight into one preallocated output tensor.  Work is
done in chunks of < 32768 values (all blocks of a chunk at once), so temporaries
stay in L2 and ATen runs each op inline instead of in an OpenMP region (see
``_CHUNK_ELEMENTS``).  Per-block scales are computed once per tensor.

SmolLM2-135M-Instruct Q4_1 (98 MB, 134.5M values) dequantizes in ~0.2-0.3 s on
a 2-core AVX2 machine, ~5x faster than ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import gguf
import numpy as np
import torch

QT = gguf.GGMLQuantizationType
QK_K = 256

__all__ = [
    "SUPPORTED",
    "UnsupportedTensorType",
    "dequantize",
    "dequantize_tensor",
    "q4_blocks",
    "Q4Blocks",
]


class UnsupportedTensorType(ValueError):
    """A GGUF tensor has a ggml type this module cannot dequantize."""

    def __init__(self, name: str, qtype: object):
        self.tensor_name = name
        self.qtype = qtype
        tname = getattr(qtype, "name", None) or f"type id {qtype!r}"
        supported = ", ".join(sorted(t.name for t in SUPPORTED))
        super().__init__(
            f"tensor {name!r} has unsupported GGML type {tname}; supported types: {supported}"
        )


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

# Every torch op below works on fewer than at::internal::GRAIN_SIZE (32768)
# elements, so ATen runs it inline on the calling thread instead of opening an
# OpenMP parallel region.  Dequantizing a model issues thousands of ops; on a
# 2-core machine shared with other processes each parallel region can stall
# for a scheduler time slice waiting for its second thread (measured: 0.2 s
# -> 4-9 s for SmolLM2-135M under load), while the inline version stays at
# ~0.2-0.4 s.  The work is memory-bound, so the second core buys little here.
_CHUNK_ELEMENTS = 32767

_SHIFT4 = torch.tensor([0, 4], dtype=torch.uint8)
_SHIFT2x4 = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
_SHIFT8 = torch.arange(8, dtype=torch.uint8)


def _rows(n: int, width: int):
    """(start, end) ranges over n rows so that each range holds < _CHUNK_ELEMENTS values."""
    step = max(1, _CHUNK_ELEMENTS // width)
    for s in range(0, n, step):
        yield s, min(s + step, n)


def _as_qtype(qtype: object, name: str) -> QT:
    if isinstance(qtype, QT):
        return qtype
    try:
        return QT(int(qtype))  # type: ignore[call-overload]
    except (ValueError, TypeError):
        raise UnsupportedTensorType(name, qtype) from None


def _bytes_tensor(raw: np.ndarray) -> torch.Tensor:
    """Flat uint8 torch view of ``raw``'s bytes (no copy for contiguous input)."""
    arr = np.asarray(raw)
    if not arr.flags["C_CONTIGUOUS"]:
        arr = np.ascontiguousarray(arr)
    arr = arr.reshape(-1).view(np.uint8)
    with warnings.catch_warnings():
        # memmaps from GGUFReader are read-only; we never write through this view.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _f16_field(field: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 slice of the blocks -> [n, 1] float32 (fp16 reinterpret, exact widen)."""
    f = field.view(torch.float16)
    res = torch.empty(f.shape, dtype=torch.float32)
    for s, e in _rows(f.shape[0], 2):
        res[s:e].copy_(f[s:e])
    return res


def _k_scales(blocks: torch.Tensor, off: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: d, dmin (fp16 at off-4, off-2) and 12-byte packed 6-bit scales at off.

    Returns (d * scale, dmin * min) as float32 [n, 8, 1], like get_scale_min_k4 in
    ggml-quants.c:
      j < 4:  sc = q[j] & 63,                          m = q[j+4] & 63
      j >= 4: sc = (q[j+4] & 0xF) | (q[j-4] >> 6) << 4, m = (q[j+4] >> 4) | (q[j] >> 6) << 4
    """
    n = blocks.shape[0]
    d = _f16_field(blocks[:, off - 4:off - 2])
    dmin = _f16_field(blocks[:, off - 2:off])
    dl = torch.empty((n, 8, 1), dtype=torch.float32)
    ml = torch.empty((n, 8, 1), dtype=torch.float32)
    sc = blocks[:, off:off + 12]
    for s, e in _rows(n, 12):
        a, b, c = sc[s:e, 0:4], sc[s:e, 4:8], sc[s:e, 8:12]
        u = torch.empty((e - s, 2, 8), dtype=torch.uint8)
        torch.bitwise_and(a, 63, out=u[:, 0, 0:4])
        torch.bitwise_or(c & 15, (a >> 6) << 4, out=u[:, 0, 4:8])
        torch.bitwise_and(b, 63, out=u[:, 1, 0:4])
        torch.bitwise_or(c >> 4, (b >> 6) << 4, out=u[:, 1, 4:8])
        torch.mul(d[s:e], u[:, 0], out=dl[s:e, :, 0])
        torch.mul(dmin[s:e], u[:, 1], out=ml[s:e, :, 0])
    return dl, ml


def _scaled_int8(blocks: torch.Tensor, off: int, d: torch.Tensor, count: int) -> torch.Tensor:
    """d * (int8 scales at off, ``count`` per block) -> float32 [n, count, 1]."""
    n = blocks.shape[0]
    sc = blocks[:, off:off + count].view(torch.int8)
    res = torch.empty((n, count, 1), dtype=torch.float32)
    for s, e in _rows(n, count):
        torch.mul(d[s:e], sc[s:e], out=res[s:e, :, 0])
    return res


# ---------------------------------------------------------------------------
# per-type kernels: blocks [n, type_size] uint8 -> write out [n, block_size] float32
# Each value is computed with the float32 operations (and order) of
# gguf.quants / ggml-quants.c: widen the integer code to float, then
# ``(d * scale) * q`` and ``- (dmin * min)`` or ``+ m``.
# ---------------------------------------------------------------------------


def _deq_q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block_q8_0: d (fp16), qs[32] (int8); y = qs * d
    d = _f16_field(blocks[:, 0:2])
    qs = blocks[:, 2:34].view(torch.int8)
    for s, e in _rows(blocks.shape[0], 32):
        o = out[s:e]
        o.copy_(qs[s:e])
        o.mul_(d[s:e])


def _deq_32(blocks: torch.Tensor, out: torch.Tensor, qs_off: int, qh_off: int | None,
            m_off: int | None, offset: int) -> None:
    """Q4_0 / Q4_1 / Q5_0 / Q5_1 (32-element blocks, fp16 d at byte 0).

    Element i < 16 is the low nibble of qs[i], element i + 16 its high nibble;
    Q5 adds bit i of the little-endian uint32 qh as bit 4 of element i.
    y = (q - offset) * d  (Q4_0: offset 8, Q5_0: 16), or y = q * d + m (Q4_1, Q5_1).
    """
    n = blocks.shape[0]
    d = _f16_field(blocks[:, 0:2])
    m = _f16_field(blocks[:, m_off:m_off + 2]) if m_off is not None else None
    qs = blocks[:, qs_off:qs_off + 16]
    qh = blocks[:, qh_off:qh_off + 4] if qh_off is not None else None
    buf = torch.empty((min(n, max(1, _CHUNK_ELEMENTS // 32)), 2, 16), dtype=torch.uint8)
    lo, hi, q, qi = buf[:, 0], buf[:, 1], buf.view(-1, 32), buf.view(-1, 32).view(torch.int8)
    for s, e in _rows(n, 32):
        k = e - s
        c = qs[s:e]
        torch.bitwise_and(c, 15, out=lo[:k])
        torch.bitwise_right_shift(c, 4, out=hi[:k])
        if qh is not None:
            # element j takes bit j of the uint32 = bit j % 8 of byte j // 8
            hb = (qh[s:e].unsqueeze(-1) >> _SHIFT8) & 1
            q[:k].bitwise_or_(hb.view(k, 32) << 4)
        o = out[s:e]
        if offset:
            q[:k].sub_(offset)  # wraps in uint8; the int8 view below is exactly q - offset
            o.copy_(qi[:k])
        else:
            o.copy_(q[:k])
        o.mul_(d[s:e])
        if m is not None:
            o.add_(m[s:e])


def _deq_q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    _deq_32(blocks, out, qs_off=2, qh_off=None, m_off=None, offset=8)  # d, qs[16]


def _deq_q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    _deq_32(blocks, out, qs_off=4, qh_off=None, m_off=2, offset=0)  # d, m, qs[16]


def _deq_q5_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    _deq_32(blocks, out, qs_off=6, qh_off=2, m_off=None, offset=16)  # d, qh[4], qs[16]


def _deq_q5_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    _deq_32(blocks, out, qs_off=8, qh_off=4, m_off=2, offset=0)  # d, m, qh[4], qs[16]


def _deq_q2_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block_q2_K: scales[16] (lo4 = scale, hi4 = min), qs[64], d, dmin
    # element 128*h + 32*j + l: (qs[32*h + l] >> 2j) & 3, scale/min index = element // 16
    n = blocks.shape[0]
    d = _f16_field(blocks[:, 80:82])
    dmin = _f16_field(blocks[:, 82:84])
    sc = blocks[:, 0:16]
    dl = torch.empty((n, 16, 1), dtype=torch.float32)
    ml = torch.empty((n, 16, 1), dtype=torch.float32)
    for s, e in _rows(n, 16):
        torch.mul(d[s:e], sc[s:e] & 15, out=dl[s:e, :, 0])
        torch.mul(dmin[s:e], sc[s:e] >> 4, out=ml[s:e, :, 0])
    qs = blocks[:, 16:80]
    for s, e in _rows(n, QK_K):
        k = e - s
        q = (qs[s:e].view(k, 2, 1, 32) >> _SHIFT2x4.view(1, 1, 4, 1)).bitwise_and_(3)
        o = out[s:e].view(k, 16, 16)
        o.copy_(q.view(k, 16, 16))
        o.mul_(dl[s:e]).sub_(ml[s:e])


def _deq_q3_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block_q3_K: hmask[32], qs[64], scales[12] (16 x 6-bit, -32), d
    # element 128*h + 32*j + l: low2 = (qs[32h+l] >> 2j) & 3, hbit = (hmask[l] >> (4h+j)) & 1,
    # q = low2 - (hbit ? 0 : 4); scale index = element // 16
    n = blocks.shape[0]
    d = _f16_field(blocks[:, 108:110])
    sc = blocks[:, 96:108]
    dl = torch.empty((n, 16, 1), dtype=torch.float32)
    for s, e in _rows(n, 16):
        k = e - s
        lo = (sc[s:e, 0:8].view(k, 1, 8) >> _SHIFT4.view(1, 2, 1)) & 15  # scale i<8: lo nibble of byte i, else hi of i-8
        hi = (sc[s:e, 8:12].view(k, 1, 4) >> _SHIFT2x4.view(1, 4, 1)) & 3  # bits 2*(i//4) of byte 8 + i%4
        u = lo.view(k, 16).bitwise_or_(hi.view(k, 16) << 4).sub_(32).view(torch.int8)
        torch.mul(d[s:e], u, out=dl[s:e, :, 0])
    hmask, qs = blocks[:, 0:32], blocks[:, 32:96]
    for s, e in _rows(n, QK_K):
        k = e - s
        q = (qs[s:e].view(k, 2, 1, 32) >> _SHIFT2x4.view(1, 1, 4, 1)).bitwise_and_(3)
        hb = (hmask[s:e].view(k, 1, 32) >> _SHIFT8.view(1, 8, 1)).bitwise_and_(1)
        # q + 4*hbit - 4 == q - (hbit ? 0 : 4)
        q = q.view(k, 8, 32).bitwise_or_(hb << 2).sub_(4).view(torch.int8)
        o = out[s:e].view(k, 16, 16)
        o.copy_(q.view(k, 16, 16))
        o.mul_(dl[s:e])


def _deq_q45_k(blocks: torch.Tensor, out: torch.Tensor, qs: torch.Tensor, qh: torch.Tensor | None) -> None:
    """Q4_K (``qh`` None) / Q5_K: the nibbles of ``qs`` [n, 128], with Q5_K's 5th bits from ``qh`` [n, 32]."""
    n = blocks.shape[0]
    dl, ml = _k_scales(blocks, 4)
    buf = torch.empty((min(n, max(1, _CHUNK_ELEMENTS // QK_K)), 4, 2, 32), dtype=torch.uint8)
    lo, hi, q = buf[:, :, 0], buf[:, :, 1], buf.view(-1, 8, 32)
    for s, e in _rows(n, QK_K):
        k = e - s
        c = qs[s:e].view(k, 4, 32)
        torch.bitwise_and(c, 15, out=lo[:k])
        torch.bitwise_right_shift(c, 4, out=hi[:k])
        if qh is not None:
            hb = (qh[s:e].view(k, 1, 32) >> _SHIFT8.view(1, 8, 1)).bitwise_and_(1)
            q[:k].bitwise_or_(hb << 4)
        o = out[s:e].view(k, 8, 32)
        o.copy_(q[:k])
        o.mul_(dl[s:e]).sub_(ml[s:e])


def _deq_q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block_q4_K: d, dmin, scales[12], qs[128]
    # sub-block 2j = low nibbles of qs[32j:32j+32], 2j+1 = their high nibbles
    _deq_q45_k(blocks, out, blocks[:, 16:144], None)


def _deq_q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block_q5_K: d, dmin, scales[12], qh[32], qs[128]
    # as Q4_K, plus bit s of qh[l] is bit 4 of element l of sub-block s
    _deq_q45_k(blocks, out, blocks[:, 48:176], blocks[:, 16:48])


def _deq_q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # block_q6_K: ql[128], qh[64], scales[16] (int8), d
    # element 128*h + 32*c + l (c = 0..3):
    #   low4  = ql[64h + l + 32*(c&1)] >> (4*(c>>1)) & 15,  high2 = qh[32h + l] >> 2c & 3
    #   q = low4 | high2 << 4, minus 32; scale index = element // 16
    n = blocks.shape[0]
    d = _f16_field(blocks[:, 208:210])
    dl = _scaled_int8(blocks, 192, d, 16)
    ql, qh = blocks[:, 0:128], blocks[:, 128:192]
    buf = torch.empty((min(n, max(1, _CHUNK_ELEMENTS // QK_K)), 2, 2, 64), dtype=torch.uint8)
    lo, hi, q = buf[:, :, 0], buf[:, :, 1], buf.view(-1, 2, 4, 32)
    for s, e in _rows(n, QK_K):
        k = e - s
        c = ql[s:e].view(k, 2, 64)
        torch.bitwise_and(c, 15, out=lo[:k])
        torch.bitwise_right_shift(c, 4, out=hi[:k])
        hb = (qh[s:e].view(k, 2, 1, 32) >> _SHIFT2x4.view(1, 1, 4, 1)).bitwise_and_(3)
        qk = q[:k].bitwise_or_(hb << 4).sub_(32).view(torch.int8)
        o = out[s:e].view(k, 16, 16)
        o.copy_(qk.view(k, 16, 16))
        o.mul_(dl[s:e])


_BLOCK_KERNELS: dict[QT, Callable[[torch.Tensor, torch.Tensor], None]] = {
    QT.Q8_0: _deq_q8_0,
    QT.Q4_0: _deq_q4_0,
    QT.Q4_1: _deq_q4_1,
    QT.Q5_0: _deq_q5_0,
    QT.Q5_1: _deq_q5_1,
    QT.Q2_K: _deq_q2_k,
    QT.Q3_K: _deq_q3_k,
    QT.Q4_K: _deq_q4_k,
    QT.Q5_K: _deq_q5_k,
    QT.Q6_K: _deq_q6_k,
}

SUPPORTED: frozenset[QT] = frozenset({QT.F32, QT.F16, QT.BF16, *_BLOCK_KERNELS})


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def _check_shape(shape: Sequence[int], qtype: QT, name: str) -> tuple[tuple[int, ...], int]:
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"tensor {name!r}: negative dimension in shape {shape}")
    n_el = math.prod(shape)
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    if block_size > 1 and (not shape or shape[-1] % block_size):
        raise ValueError(
            f"tensor {name!r}: innermost dimension of shape {shape} is not a multiple "
            f"of the {qtype.name} block size {block_size}"
        )
    return shape, n_el


def dequantize(raw: np.ndarray, qtype, shape: tuple[int, ...], name: str = "") -> torch.Tensor:
    """Dequantize the raw GGUF data of one tensor to a new float32 torch tensor.

    raw:   the tensor's data as stored (e.g. ``ReaderTensor.data``): raw block bytes
           (any shape/dtype, only its bytes matter) or a typed F32/F16 array.
    qtype: a ``gguf.GGMLQuantizationType`` (or its integer id).
    shape: the *torch* (row-major) shape of the result, i.e. the ggml shape
           reversed; the last dimension is ggml's ne[0], along which blocks run.
    name:  used in error messages only.

    Returns a contiguous float32 tensor of ``shape`` that owns its memory.
    """
    qt = _as_qtype(qtype, name)
    if qt not in SUPPORTED:
        raise UnsupportedTensorType(name, qt)
    shape, n_el = _check_shape(shape, qt, name)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qt]
    expected = n_el // block_size * type_size
    b = _bytes_tensor(raw)
    if b.numel() != expected:
        raise ValueError(
            f"tensor {name!r}: {qt.name} data of shape {shape} needs {expected} bytes, got {b.numel()}"
        )

    if qt == QT.F32:
        return b.view(torch.float32).clone().view(shape)
    if qt == QT.F16:
        return b.view(torch.float16).float().view(shape)
    if qt == QT.BF16:
        return b.view(torch.bfloat16).float().view(shape)

    n_blocks = n_el // block_size
    out = torch.empty((n_blocks, block_size), dtype=torch.float32)
    if n_blocks:
        _BLOCK_KERNELS[qt](b.view(n_blocks, type_size), out)
    return out.view(shape)


def dequantize_tensor(t: gguf.ReaderTensor) -> torch.Tensor:
    """Dequantize a ``gguf.GGUFReader`` tensor to float32 in torch order.

    The result has shape ``tuple(reversed(t.shape))``: GGUF/ggml lists ne[0]
    (the contiguous dimension) first, torch lists it last.
    """
    shape = tuple(int(s) for s in reversed(list(t.shape)))
    return dequantize(t.data, t.tensor_type, shape, t.name)


class Q4Blocks(NamedTuple):
    """Raw Q4_0/Q4_1 data of a 2-D view ``[rows, in_features]`` of a tensor.

    scales:  float16 [rows, in_features // 32], the per-block ``d``
    mins:    float16 [rows, in_features // 32] (Q4_1 ``m``) or None (Q4_0)
    nibbles: uint8 [rows, in_features // 2]; element ``2k`` of a row is in the low
             nibble of byte ``k`` and element ``2k+1`` in the high nibble.  Values
             are the unsigned codes q in 0..15: Q4_0 weight = (q - 8) * d,
             Q4_1 weight = q * d + m.
    """

    scales: torch.Tensor
    mins: torch.Tensor | None
    nibbles: torch.Tensor


def q4_blocks(raw: np.ndarray, qtype, shape: tuple[int, ...]) -> Q4Blocks:
    """Split Q4_0/Q4_1 data into scales, mins and element-ordered nibbles, no dequantization.

    ``shape`` is the torch shape (as for :func:`dequantize`); all leading
    dimensions are flattened into rows.  ggml stores block element ``i`` (i < 16)
    in the low nibble of byte ``i`` and element ``i + 16`` in its high nibble;
    the returned nibbles are repacked to plain element order (low nibble first).
    """
    qt = _as_qtype(qtype, "")
    if qt not in (QT.Q4_0, QT.Q4_1):
        raise ValueError(f"q4_blocks needs Q4_0 or Q4_1 data, got {qt.name}")
    shape, n_el = _check_shape(shape, qt, "")
    _, type_size = gguf.GGML_QUANT_SIZES[qt]
    cols = shape[-1]
    rows = n_el // cols if cols else 0
    nb = cols // 32
    b = _bytes_tensor(raw)
    if b.numel() != rows * nb * type_size:
        raise ValueError(f"{qt.name} data of shape {shape} needs {rows * nb * type_size} bytes, got {b.numel()}")
    blk = b.view(rows, nb, type_size)
    off = 2 if qt == QT.Q4_0 else 4
    scales = blk[:, :, 0:2].contiguous().view(torch.float16).view(rows, nb)
    mins = blk[:, :, 2:4].contiguous().view(torch.float16).view(rows, nb) if qt == QT.Q4_1 else None
    qs = blk[:, :, off:off + 16]
    # element order within a block: q[0..15] = qs & 15, q[16..31] = qs >> 4
    q = torch.empty((rows, nb, 2, 16), dtype=torch.uint8)
    torch.bitwise_and(qs, 15, out=q[:, :, 0])
    torch.bitwise_right_shift(qs, 4, out=q[:, :, 1])
    q = q.view(rows, nb * 16, 2)
    nibbles = q[..., 0] | (q[..., 1] << 4)
    return Q4Blocks(scales, mins, nibbles.view(rows, cols // 2))
