"""GGUF block types run natively: ``y = x @ W.T + bias`` on a GGUF tensor's own quantized blocks.

Supported: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (:func:`supported_types`).

Usage::

    packed = pack_gguf(raw, "Q4_K", (out_features, in_features))   # once, at load
    y = gguf_linear(x, packed, bias)                                # x [..., K] -> [..., N]

``raw`` is the tensor's data as stored in the file (``uint8 [N, bytes_per_row]`` or flat; only its
bytes matter), ``shape`` the torch shape ``(N, K)`` (the GGUF shape reversed). :func:`pack_gguf`
rearranges the blocks once into a lossless layout for 16-column SIMD (csrc/gguf_kernels.h: the
fp16 scales / mins of 16 columns side by side, then the codes of 16 columns interleaved, in k
order); the kernels decode each weight to exactly the fp32 value ``gguf.quants.dequantize`` gives,
so results equal the dequantized fp32 model up to float summation order.

Summation order and batch invariance: every output is one fma chain over k in order, whatever the
number of rows, the row tile, the thread count or the instruction set, so row i of an M-row call
is bit-identical to the same row computed alone (tests pin this). Paths (by M):

* M <= ``small_m`` (``SMALL_M``: 4 on AVX-512, 2 on AVX2; decode): weights decoded in registers,
  each decoded 16-column vector reused by up to 4 rows (GEMV);
* larger M (prefill): a chunk of 256 k x 16-32 columns is dequantized to fp32 once per thread and
  tile and fed to a register-blocked fp32 micro-kernel (6 rows x 16-32 columns).

A separate, named mode ``act="int8"`` (every type but Q2_K / Q3_K) quantizes the activations to int8
per row and 32 k and uses integer dot products, like llama.cpp's Q8 activations: faster at decode,
not exact (see :func:`gguf_linear`). The default is ``act="fp32"``.

``act="int16"`` (same types as int8, every build) quantizes the activations to int16 per row and 32 k
(scale amax / 32767, round half to even: relative error <= 2^-16 of the block's largest |x|, ~2e-5 of a
product's norm) and runs integer dot products of int16 pairs (pmaddwd / VNNI vpdpwssd: twice the
multiply-adds of an fp32 fma per instruction with VNNI), exact in int32, then the int8 mode's fold per
sub-block: batch-invariant and the same bits on every build. From 16 rows each panel's codes are decoded
once into int16 pairs (minus the type's code offset) and shared by 12-row tiles (AVX2: 6-row tiles from
4 rows) over row blocks that stay in L2 (1.56-1.85x the fp32 path at 128-2048 rows on a Zen 4 with VNNI,
2 threads; 1.1-1.25x on a Zen 3's AVX2 build; slower than the fp32 path on the AVX-512 build without
VNNI: :func:`int16_fast`); fewer rows take register tiles that decode in registers. The model runs the prompt rows of its "by-kind" mode with it where :func:`int16_fast`
(``models/gguf_linear.py``; ``LLMOPT_GGUF_PROMPT_INT16=0`` / ``1`` turns that off / on everywhere).

``act="bf16x3"`` (the AMX build on a CPU with AMX-BF16, same types as int8: :func:`bf16x3_available`)
is fp32 activations on AMX-BF16 tiles: each activation split exactly into three bf16 parts, the codes
exact in bf16, fp32 accumulation per sub-block, then the block scales (csrc/gguf_amx.h). The result is
``x @ W.T`` up to fp32 rounding (measured closer to the float64 product than the fp32 path's chain)
but not the fp32 path's bits; each row's bits depend on that row alone (batch-invariant). 1.6-1.8x
the fp32 path's speed from 64 rows on (one thread); slower at a few rows (16-row tiles, weights
unpacked per call), so the model uses it for prompt rows only (``models/gguf_linear.py``).

Instruction sets (:func:`cpu_path`): the same C++ source is built once per ISA (AVX2/FMA/F16C, the
floor; AVX-512 F/BW/VL; AVX-512 + VNNI, which only changes the int8 mode's dot products; AVX-512 VNNI
+ AMX-INT8, which runs the int8 mode's rows 16 at a time on AMX tiles: csrc/gguf_amx.h) and the
best one the CPU reports is chosen at the first call. Every path gives the same bits.
``LLMOPT_CPU_PATH`` (``avx512_amx``, ``avx512_vnni``, ``avx512``, ``avx2``, ``reference``; read once)
forces a lower path, e.g. to test the AVX2 path on an AVX-512 machine. A CPU without AVX2/FMA (or ``LLMOPT_NATIVE=0``) gets the
plain-torch reference (dequantize, then ``F.linear``) with one warning: never an illegal instruction.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from types import ModuleType

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from llmopt.formats.layouts import PackedWeightSize

from . import build

log = logging.getLogger(__name__)

QT = gguf.GGMLQuantizationType
LANES = 16

__all__ = [
    "PATHS",
    "GGUFPacked",
    "KernelTable",
    "available_paths",
    "bf16x3_available",
    "int16_fast",
    "cpu_path",
    "dequantize_packed",
    "gguf_embedding",
    "gguf_linear",
    "kernel_table",
    "native_dequantize",
    "native_module",
    "pack_gguf",
    "quantize_act_int16",
    "quantize_act_int8",
    "supported_types",
]

PATHS = ("avx512_amx", "avx512_vnni", "avx512", "avx2")  # native paths, best first
_SC_NONE, _SC_U8, _SC_S8, _SC_NIB = 0, 1, 2, 3


@dataclass(frozen=True)
class _TypeDesc:
    """Mirror of ``TypeDesc`` in csrc/gguf_kernels.h (block QB, sub-block S, low / high code bits
    L / H, second fp16 M2, sub-block scale kind SCK, sub-block mins MN, code offset OFF)."""

    qt: QT
    qb: int
    s: int
    l: int
    h: int
    m2: bool
    sck: int
    mn: bool
    off: int
    signed: bool

    @property
    def ns(self) -> int:
        return self.qb // self.s

    @property
    def a8(self) -> bool:
        """Has the int8-activation kernel (``kA8`` in csrc/gguf_kernels.h)."""
        return ((self.s == 32 and self.h == 0 and self.l in (4, 8)) or (self.s == 32 and self.l == 4 and self.h == 1)
                or (self.s == 16 and self.l == 4 and self.h == 2 and self.sck == _SC_S8 and not self.m2))

    @property
    def lane_major(self) -> bool:
        """The 4-bit low plane (and the high plane) stored lane-major (``TypeDesc::LM``)."""
        return self.l == 4

    @property
    def sections(self) -> list[tuple[str, int]]:
        """(name, bytes) of one 16-column block, in order."""
        out = [("d", 32)]
        if self.m2:
            out.append(("m2", 32))
        if self.sck != _SC_NONE:
            out.append(("sc", self.ns * 16))
        if self.mn:
            out.append(("mn", self.ns * 16))
        out.append(("low", self.qb * 16 * self.l // 8))
        if self.h:
            out.append(("high", self.qb * 16 * self.h // 8))
        return out

    @property
    def block_bytes(self) -> int:
        return sum(b for _, b in self.sections)


_TYPES: dict[QT, _TypeDesc] = {
    t.qt: t
    for t in (
        #          QB   S  L  H  M2     SCK      MN     OFF SIGNED
        _TypeDesc(QT.Q4_0, 32, 32, 4, 0, False, _SC_NONE, False, 8, False),
        _TypeDesc(QT.Q4_1, 32, 32, 4, 0, True, _SC_NONE, False, 0, False),
        _TypeDesc(QT.Q5_0, 32, 32, 4, 1, False, _SC_NONE, False, 16, False),
        _TypeDesc(QT.Q5_1, 32, 32, 4, 1, True, _SC_NONE, False, 0, False),
        _TypeDesc(QT.Q8_0, 32, 32, 8, 0, False, _SC_NONE, False, 0, True),
        _TypeDesc(QT.Q2_K, 256, 16, 2, 0, True, _SC_NIB, False, 0, False),
        _TypeDesc(QT.Q3_K, 256, 16, 2, 1, False, _SC_S8, False, 4, False),
        _TypeDesc(QT.Q4_K, 256, 32, 4, 0, True, _SC_U8, True, 0, False),
        _TypeDesc(QT.Q5_K, 256, 32, 4, 1, True, _SC_U8, True, 0, False),
        _TypeDesc(QT.Q6_K, 256, 16, 4, 2, False, _SC_S8, False, 32, False),
    )
}


def supported_types(act: str = "fp32") -> list[str]:
    """Names of the GGUF types with a native kernel (``gguf.GGMLQuantizationType`` names) for
    fp32 activations (every type) or, ``act="int8"``, int8 activations (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
    Q4_K, Q5_K, Q6_K: every type but Q2_K and Q3_K)."""
    if act == "int8":
        return [t.qt.name for t in _TYPES.values() if t.a8]
    if act != "fp32":
        raise ValueError(f"act must be 'fp32' or 'int8', got {act!r}")
    return [t.name for t in _TYPES]


@dataclass(frozen=True, eq=False)
class GGUFPacked(PackedWeightSize):
    """A GGUF weight ``[N, K]`` in the kernels' layout (see csrc/gguf_kernels.h).

    data: uint8 ``[ceil(N / 16), K / block, block_bytes]``; ``name`` is only used in messages."""

    ggml_type: int
    shape: tuple[int, int]
    data: torch.Tensor
    name: str = ""

    @property
    def type_name(self) -> str:
        return QT(self.ggml_type).name

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def __repr__(self) -> str:
        return (f"GGUFPacked({self.name or 'tensor'!r}, {self.type_name}, shape={self.shape}, "
                f"{self.bits_per_weight:.2f} bits/weight)")


# ---------------------------------------------------------------------------------------------
# packing: GGUF blocks -> (d, m2, sc, mn, codes) -> 16-column layout
# ---------------------------------------------------------------------------------------------


def _f16_bits(b: np.ndarray, off: int) -> np.ndarray:
    return np.ascontiguousarray(b[..., off:off + 2]).view(np.uint16)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: element i < 16 low nibble of byte i, i + 16 its high nibble."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _bits32(qh: np.ndarray) -> np.ndarray:
    """[..., 4] bytes (little-endian uint32) -> [..., 32]: bit i."""
    return ((qh[..., :, None] >> np.arange(8, dtype=np.uint8)) & 1).reshape(*qh.shape[:-1], 32)


def _q45k_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 packed bytes -> 8 six-bit scales, 8 six-bit mins (ggml's get_scale_min_k4)."""
    a, b, c = sc[..., 0:4], sc[..., 4:8], sc[..., 8:12]
    scale = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=-1)
    mins = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return scale, mins


def _fields(t: _TypeDesc, b: np.ndarray) -> dict[str, np.ndarray]:
    """Blocks ``[..., type_size]`` -> d / m2 (uint16 fp16 bits), sc / mn ``[..., NS]`` (uint8, signed
    ones as their bits) and codes q ``[..., QB]`` (uint8, unsigned; Q8_0: the int8 bits)."""
    qt = t.qt
    f: dict[str, np.ndarray] = {}
    if qt in (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0):
        f["d"] = _f16_bits(b, 0)
        o = 2
        if t.m2:
            f["m2"] = _f16_bits(b, 2)
            o = 4
        if qt == QT.Q8_0:
            f["q"] = b[..., 2:34]
        elif t.h:
            hb = _bits32(b[..., o:o + 4])
            f["q"] = _nibbles(b[..., o + 4:o + 20]) | (hb << 4)
        else:
            f["q"] = _nibbles(b[..., o:o + 16])
    elif qt == QT.Q2_K:  # scales[16], qs[64], d, dmin
        f["sc"] = b[..., 0:16]
        qs = b[..., 16:80].reshape(*b.shape[:-1], 2, 1, 32)
        f["q"] = ((qs >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3).reshape(*b.shape[:-1], 256)
        f["d"], f["m2"] = _f16_bits(b, 80), _f16_bits(b, 82)
    elif qt == QT.Q3_K:  # hmask[32], qs[64], scales[12], d
        lead = b.shape[:-1]
        qs = b[..., 32:96].reshape(*lead, 2, 1, 32)
        low = ((qs >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3).reshape(*lead, 256)
        hm = b[..., 0:32].reshape(*lead, 1, 32)
        hbit = ((hm >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1).reshape(*lead, 256)
        f["q"] = low | (hbit << 2)
        sc = b[..., 96:108]
        lo = ((sc[..., None, 0:8] >> np.array([0, 4], np.uint8).reshape(2, 1)) & 15).reshape(*lead, 16)
        hi = ((sc[..., None, 8:12] >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3).reshape(*lead, 16)
        f["sc"] = ((lo | (hi << 4)).astype(np.int16) - 32).astype(np.int8).view(np.uint8)
        f["d"] = _f16_bits(b, 108)
    elif qt in (QT.Q4_K, QT.Q5_K):  # d, dmin, scales[12], (qh[32]), qs[128]
        lead = b.shape[:-1]
        f["d"], f["m2"] = _f16_bits(b, 0), _f16_bits(b, 2)
        f["sc"], f["mn"] = _q45k_scales(b[..., 4:16])
        o = 16 if qt == QT.Q4_K else 48
        qs = b[..., o:o + 128].reshape(*lead, 4, 1, 32)
        q = ((qs >> np.array([0, 4], np.uint8).reshape(2, 1)) & 15).reshape(*lead, 256)
        if qt == QT.Q5_K:
            qh = b[..., 16:48].reshape(*lead, 1, 32)
            q = q | (((qh >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1).reshape(*lead, 256) << 4)
        f["q"] = q
    elif qt == QT.Q6_K:  # ql[128], qh[64], scales[16] (int8), d
        lead = b.shape[:-1]
        ql = b[..., 0:128].reshape(*lead, 2, 1, 64)
        ql = ((ql >> np.array([0, 4], np.uint8).reshape(2, 1)) & 15).reshape(*lead, 256)
        qh = b[..., 128:192].reshape(*lead, 2, 1, 32)
        qh = ((qh >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3).reshape(*lead, 256)
        f["q"] = ql | (qh << 4)
        f["sc"] = b[..., 192:208]
        f["d"] = _f16_bits(b, 208)
    else:  # pragma: no cover - _TYPES and this function list the same types
        raise AssertionError(qt)
    return f


def _plane(codes: np.ndarray, bits: int, lane_major: bool = False) -> np.ndarray:
    """codes ``[P, 16, nblk, QB]`` (values < 2**bits) -> ``[P, nblk, QB * 16 * bits / 8]`` bytes:
    byte (g, c) = sum_j codes[c][g * per + j] << bits * j, per = 8 / bits; lane_major (4-bit planes
    of T::LM types): byte (g // 4, c, g % 4) instead (the 4 bytes of 8 k of a column together)."""
    p, _, nblk, qb = codes.shape
    per = 8 // bits
    c = codes.reshape(p, LANES, nblk, qb // per, per).astype(np.uint8)
    acc = np.zeros(c.shape[:-1], np.uint8)
    for j in range(per):
        acc |= c[..., j] << np.uint8(bits * j)
    if lane_major:
        acc = acc.reshape(p, LANES, nblk, qb // per // 4, 4).transpose(0, 2, 3, 1, 4)
        return np.ascontiguousarray(acc).reshape(p, nblk, -1)
    return np.ascontiguousarray(acc.transpose(0, 2, 3, 1)).reshape(p, nblk, -1)


def _high_lanes(hbits: np.ndarray, bits: int) -> np.ndarray:
    """High codes ``[P, 16, nblk, QB]`` (``bits`` each) -> the lane-major high plane ``[P, nblk,
    QB / kh * 64]``: per kh = 32 / bits k one 32-bit lane per column, bits 8 i + bits (2 gg + h) ..
    of it = the high bits of k = 8 gg + 2 i + h."""
    p, _, nblk, qb = hbits.shape
    kh, ngg = 32 // bits, 4 // bits
    h = hbits.reshape(p, LANES, nblk, qb // kh, ngg, 4, 2).astype(np.uint8)  # [.., gg, i, h]
    acc = np.zeros((p, LANES, nblk, qb // kh, 4), np.uint8)  # [.., i]
    for gg in range(ngg):
        for hh in range(2):
            acc |= h[..., gg, :, hh] << np.uint8(bits * (2 * gg + hh))
    return np.ascontiguousarray(acc.transpose(0, 2, 3, 1, 4)).reshape(p, nblk, -1)


def _as_qtype(ggml_type: int | str | gguf.GGMLQuantizationType, name: str) -> gguf.GGMLQuantizationType:
    try:
        if isinstance(ggml_type, str):
            return gguf.GGMLQuantizationType[ggml_type.upper()]
        return QT(int(ggml_type))
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"tensor {name or '?'!r}: unknown GGML type {ggml_type!r}; native types: "
                         f"{', '.join(supported_types())}") from None


def pack_gguf(raw: torch.Tensor | np.ndarray, ggml_type: int | str | gguf.GGMLQuantizationType, shape: tuple[int, int] | list[int],
              name: str = "") -> GGUFPacked:
    """Repack a GGUF tensor's raw blocks (as read from the file) for :func:`gguf_linear`, losslessly.

    raw: the stored bytes (uint8 ``[N, bytes_per_row]``, flat, or any array whose bytes are the
         blocks); ggml_type: id, name ("Q4_K") or ``gguf.GGMLQuantizationType``; shape: torch shape
         ``(N, K)`` = the GGUF shape reversed (blocks run along K). ``name`` is used in errors.
    Raises ValueError (naming the tensor and type) for a type without a native kernel, a shape that is
    not 2-D or whose K is not a multiple of the block size, or a byte count that does not match."""
    qt = _as_qtype(ggml_type, name)
    label = name or "tensor"
    if qt not in _TYPES:
        raise ValueError(f"{label!r} has GGML type {qt.name}, which has no native kernel; native types: "
                         f"{', '.join(supported_types())} (dequantize it instead)")
    t = _TYPES[qt]
    dims = tuple(int(s) for s in shape)
    if len(dims) != 2 or min(dims) <= 0:
        raise ValueError(f"{label!r} ({qt.name}): shape must be 2-D (out_features, in_features) with "
                         f"positive sizes, got {dims}")
    n, k = dims
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    if k % block:
        raise ValueError(f"{label!r} ({qt.name}): in_features {k} is not a multiple of the block size {block}; "
                         f"pass the torch shape (out_features, in_features), i.e. the GGUF shape reversed")
    if isinstance(raw, torch.Tensor):
        arr = raw.detach().cpu().contiguous().view(torch.uint8).numpy()
    else:
        arr = np.ascontiguousarray(np.asarray(raw)).view(np.uint8)
    nblk = k // block
    expected = n * nblk * type_size
    if arr.size != expected:
        raise ValueError(f"{label!r} ({qt.name}, shape {dims}): expected {expected} bytes of blocks "
                         f"({n} rows x {nblk} blocks x {type_size} B), got {arr.size}")
    blocks = arr.reshape(n, nblk, type_size)
    p = (n + LANES - 1) // LANES
    if p * LANES != n:  # zero rows (d = 0: weights 0) up to a whole panel
        blocks = np.concatenate([blocks, np.zeros((p * LANES - n, nblk, type_size), np.uint8)], axis=0)
    f = _fields(t, blocks.reshape(p, LANES, nblk, type_size))
    parts = []
    for sec, nbytes in t.sections:
        if sec in ("d", "m2"):
            a = np.ascontiguousarray(f[sec].transpose(0, 2, 1)).view(np.uint8)  # [P, nblk, 16] fp16 bits
        elif sec in ("sc", "mn"):
            a = np.ascontiguousarray(f[sec].transpose(0, 2, 3, 1))  # [P, nblk, NS, 16]
        elif sec == "low" and t.l == 8:  # one code per byte: just interleave the columns
            a = np.ascontiguousarray(f["q"].transpose(0, 2, 3, 1))
        elif sec == "low":
            a = _plane(f["q"] & np.uint8((1 << t.l) - 1), t.l, t.lane_major)
        elif t.lane_major:
            a = _high_lanes((f["q"] >> np.uint8(t.l)) & np.uint8((1 << t.h) - 1), t.h)
        else:
            a = _plane((f["q"] >> np.uint8(t.l)) & np.uint8((1 << t.h) - 1), t.h)
        parts.append(a.reshape(p, nblk, nbytes))
    data = torch.from_numpy(np.ascontiguousarray(np.concatenate(parts, axis=-1)))
    return GGUFPacked(int(qt), (n, k), data, name)


# ---------------------------------------------------------------------------------------------
# torch reference on the packed layout (fallback path; also checks the layout in tests)
# ---------------------------------------------------------------------------------------------


def _unplane(a: torch.Tensor, bits: int, lane_major: bool = False) -> torch.Tensor:
    """[P, nblk, QB/per * 16] bytes -> codes [P, nblk, QB, 16] (int64) (inverse of :func:`_plane`)."""
    p, nblk, nb = a.shape
    per = 8 // bits
    if lane_major:
        a = a.reshape(p, nblk, nb // 64, LANES, 4).transpose(3, 4).reshape(p, nblk, nb)
    g = a.reshape(p, nblk, nb // LANES, 1, LANES).long()
    sh = (torch.arange(per) * bits).reshape(1, 1, 1, per, 1)
    return ((g >> sh) & ((1 << bits) - 1)).reshape(p, nblk, -1, LANES)


def _unhigh_lanes(a: torch.Tensor, bits: int) -> torch.Tensor:
    """The lane-major high plane [P, nblk, QB / kh * 64] -> high codes [P, nblk, QB, 16] (inverse of
    :func:`_high_lanes`)."""
    p, nblk, nb = a.shape
    ns = 8 // bits  # selections (2 gg + h) per byte
    lanes = a.reshape(p, nblk, nb // 64, LANES, 4, 1).long()  # [.., c, i, 1]
    h = (lanes >> (torch.arange(ns) * bits).reshape(1, 1, 1, 1, 1, ns)) & ((1 << bits) - 1)  # [.., c, i, s]
    h = h.reshape(p, nblk, nb // 64, LANES, 4, ns // 2, 2)  # [.., c, i, gg, h]
    return h.permute(0, 1, 2, 5, 4, 6, 3).reshape(p, nblk, -1, LANES)  # k = 8 gg + 2 i + h


def dequantize_packed(packed: GGUFPacked) -> torch.Tensor:
    """The packed weight as fp32 ``[N, K]`` with plain torch ops: the same values as
    ``gguf.quants.dequantize`` of the original blocks, bit for bit."""
    t = _TYPES[QT(packed.ggml_type)]
    n, k = packed.shape
    data = packed.data
    p, nblk, _ = data.shape
    sec: dict[str, torch.Tensor] = {}
    o = 0
    for s, nbytes in t.sections:
        sec[s] = data[:, :, o:o + nbytes]
        o += nbytes

    def f16(a: torch.Tensor) -> torch.Tensor:  # [P, nblk, 32] bytes -> [P, nblk, 1, 16] fp32
        return a.contiguous().view(torch.float16).float().reshape(p, nblk, 1, LANES)

    if t.l == 8:
        q = sec["low"].contiguous().view(torch.int8).reshape(p, nblk, t.qb, LANES).long()
    else:
        q = _unplane(sec["low"], t.l, t.lane_major)
        if t.h and t.lane_major:
            q = q | (_unhigh_lanes(sec["high"], t.h) << t.l)
        elif t.h:
            q = q | (_unplane(sec["high"], t.h) << t.l)
    q = q.reshape(p, nblk, t.ns, t.s, LANES).float()
    d = f16(sec["d"]).unsqueeze(3)  # [P, nblk, 1, 1, 16]
    if t.sck == _SC_NONE:
        a = d
        mins = f16(sec["m2"]).unsqueeze(3) if t.m2 else None
    else:
        raw = sec["sc"].reshape(p, nblk, t.ns, 1, LANES)
        if t.sck == _SC_S8:
            sc = raw.contiguous().view(torch.int8).float()
        elif t.sck == _SC_NIB:
            sc = (raw & 15).float()
        else:
            sc = raw.float()
        a = d * sc
        mins = None
        if t.mn:
            mins = -(f16(sec["m2"]).unsqueeze(3) * sec["mn"].reshape(p, nblk, t.ns, 1, LANES).float())
        elif t.sck == _SC_NIB:
            mins = -(f16(sec["m2"]).unsqueeze(3) * (raw >> 4).float())
    if t.off:
        w = a * (q - t.off)  # the reference's own rounding: round(A * (q - OFF))
    elif mins is not None:
        w = a * q + mins  # A * q is exact here, so one rounding, like the reference
    else:
        w = a * q
    w = w.reshape(p, nblk * t.qb, LANES).permute(0, 2, 1).reshape(p * LANES, k)
    return w[:n].contiguous()


# ---------------------------------------------------------------------------------------------
# CPU feature dispatch
# ---------------------------------------------------------------------------------------------

_COMMON = ["-O3", "-fopenmp", "-ffp-contract=off"]  # no -ffast-math: the summation order is the contract
_ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl"],
    "avx512_vnni": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
    "avx512_amx": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                   "-mamx-tile", "-mamx-int8", "-mamx-bf16"],
}
_ISA_CPU_FLAGS = {  # /proc/cpuinfo flags a path needs
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"),
    "avx512_vnni": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
    "avx512_amx": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "amx_tile", "amx_int8",
                   "amx_bf16"),
}

_lock = threading.Lock()
_modules: dict[str, ModuleType | None] = {}
_chosen: str | None = None


def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    # not Linux: torch's own cpuid-based answer ("AVX512", "AVX2", "DEFAULT", ...)
    cap = torch.backends.cpu.get_cpu_capability().upper()
    flags = set()
    if cap.startswith(("AVX2", "AVX512")):
        flags |= set(_ISA_CPU_FLAGS["avx2"])
    if cap.startswith("AVX512"):
        flags |= set(_ISA_CPU_FLAGS["avx512"])  # (VNNI not inferred: torch does not report it)
    return frozenset(flags)


def _cpu_runs(path: str) -> bool:
    flags = _cpu_flags()
    return all(f in flags for f in _ISA_CPU_FLAGS[path])


def native_module(path: str) -> ModuleType | None:
    """The extension built for ``path`` ("avx2" / "avx512"), or None if the CPU cannot run it, the
    build failed or ``LLMOPT_NATIVE=0``. Built on first use (cached on disk per source hash + flags)."""
    if path not in _ISA_FLAGS:
        raise ValueError(f"unknown CPU path {path!r}; choose one of {', '.join(PATHS)}")
    with _lock:
        if path in _modules:
            return _modules[path]
    mod = None
    if build.native_enabled() and _cpu_runs(path):
        mod = build.load_extension(f"llmopt_gguf_{path}", ["gguf_linear.cpp"], _COMMON + _ISA_FLAGS[path])
        if mod is not None and mod.isa() != path:  # the build's own report (compile-time macros)
            log.warning("llmopt: GGUF kernels built for %s report %s; not using them", path, mod.isa())
            mod = None
        if mod is not None and path == "avx512_amx" and not mod.amx_ready():
            log.warning("llmopt: this CPU has AMX but the OS did not grant the tile state "
                        "(arch_prctl ARCH_REQ_XCOMP_PERM; Linux >= 5.16); using the AVX-512 VNNI path")
            mod = None
        if mod is not None:  # this CPU's measured prefetch distances (tune.py), if measured
            from . import tune

            table = tune.load_prefetch_table(mod)
            if table is not None:
                tune.apply_prefetch_table(mod, table)
    with _lock:
        _modules[path] = mod
    return mod


def available_paths() -> list[str]:
    """Native paths this CPU runs and that built, best first (builds them)."""
    return [p for p in PATHS if native_module(p) is not None]


def cpu_path() -> str:
    """The path :func:`gguf_linear` uses by default: one of :data:`PATHS` or "reference".

    Chosen once per process from what the CPU reports, lowered by ``LLMOPT_CPU_PATH`` if set
    (``avx2`` on an AVX-512 machine tests the AVX2 path; a path above the CPU's is refused with a
    warning, never run)."""
    global _chosen
    if _chosen is not None:
        return _chosen
    want = os.environ.get("LLMOPT_CPU_PATH", "").strip().lower() or "auto"
    order = ["auto", *PATHS, "reference"]
    if want not in order:
        log.warning("llmopt: LLMOPT_CPU_PATH=%r is not one of %s; choosing from the CPU", want, ", ".join(order))
        want = "auto"
    chosen = "reference"
    if want != "reference":
        candidates = list(PATHS) if want == "auto" else list(PATHS[PATHS.index(want):])
        if want != "auto" and not _cpu_runs(want):
            log.warning("llmopt: LLMOPT_CPU_PATH=%s but this CPU lacks %s; using the best path it has", want,
                        ", ".join(f for f in _ISA_CPU_FLAGS[want] if f not in _cpu_flags()))
        for p in candidates:
            if native_module(p) is not None:
                chosen = p
                break
        else:
            if build.native_enabled():
                log.warning("llmopt: no native GGUF kernel runs here (CPU without AVX2/FMA/F16C or build "
                            "failure); using the plain-torch reference (slow)")
    _chosen = chosen
    return chosen


# ---------------------------------------------------------------------------------------------
# the linear
# ---------------------------------------------------------------------------------------------

# Rows up to which the register-tile (decode) path runs, per path; above, the dequantized-panel path.
# Measured (1 thread, Zen 4, Q4_0 / Q4_K, 1536x576 and 2048x8192, benchmarks/bench_gguf_linear.py-style
# timing): AVX-512 register tiles win up to M = 4 (R = 2..4 tiles share two panels' decode); AVX2 ones
# up to M = 2 (at M = 4 the panel path is 5-20% faster). Results do not depend on it.
SMALL_M = {"avx512_amx": 4, "avx512_vnni": 4, "avx512": 4, "avx2": 2}


def gguf_linear(x: torch.Tensor, packed: GGUFPacked, bias: torch.Tensor | None = None, *,
                act: str = "fp32", path: str | None = None, small_m: int | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ W.T + bias`` -> ``[..., N]`` in x's dtype, W the packed GGUF weight.

    path: None = :func:`cpu_path`; "avx512" / "avx2" force a native build (ValueError if this CPU
    or build does not have it); "reference" = dequantize + ``F.linear``. small_m: rows up to which
    the register-tile path runs (default ``SMALL_M[path]``; results do not depend on it).
    Inference only: no autograd through the native kernels (autograd inputs take the reference).

    act: "fp32" (default) = the dequantized fp32 model up to summation order; "int8" = the separate
    int8-activation mode (decode; like llama.cpp's Q8 activations): each row quantized per 32 k to
    int8 (scale amax / 127, round half to even), integer dot products per sub-block (32 k; Q6_K 16), then
    scaled: ``x_hat @ W.T`` with ``x_hat = dequantized int8 x``, up to float rounding; batch-invariant
    too. Types: :func:`supported_types` ("int8"); others raise ValueError. "int16" = the same with int16
    activations (scale amax / 32767; same types; module docstring). "bf16x3" = fp32 activations on
    AMX-BF16 tiles (module docstring; same types; ValueError where :func:`bf16x3_available` is False).

    out: where to write the result (a contiguous float32 CPU tensor of the result's shape, e.g. a row
    range of a larger one; the native kernels write it in place); returned."""
    if not isinstance(packed, GGUFPacked):
        raise ValueError(f"packed must be a GGUFPacked (from pack_gguf), got {type(packed).__name__}")
    n, k = packed.shape
    # hot path first (decode calls this per layer per token): checks without building messages
    if (not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0 or x.shape[-1] != k
            or (bias is not None and (bias.dim() != 1 or bias.shape[0] != n)) or act not in ACTS
            or (act != "fp32" and packed.ggml_type not in _A8_IDS)):
        _raise_bad_input(x, packed, bias, act)
    use = (_chosen or cpu_path()) if path is None else path
    mod = _modules.get(use)
    if mod is None and use != "reference":
        if use not in PATHS:
            raise ValueError(f"unknown path {use!r}; choose one of {', '.join(PATHS)}, reference")
        mod = native_module(use)
        if mod is None and path is not None:
            raise ValueError(f"CPU path {use!r} is not available here (available: "
                             f"{', '.join(available_paths()) or 'none'}, reference)")
    if act == "bf16x3" and (mod is None or not _bf3_ready(mod)):
        raise ValueError(f"act='bf16x3' needs the avx512_amx path on a CPU with AMX-BF16 (path {use!r} here); "
                         "check bf16x3_available() or use act='fp32'")
    direct = (out is not None and x.dim() == 2 and x.dtype == torch.float32 and out.dtype == torch.float32
              and out.is_cpu and out.shape == (x.shape[0], n) and out.is_contiguous())
    if mod is None or not x.is_cpu or (x.requires_grad and torch.is_grad_enabled()):
        w = dequantize_packed(packed).to(x.device)
        xf = x.float()
        if act in ("int8", "int16"):
            xf = _QUANT_ACT[act](xf.reshape(-1, k)).reshape(x.shape)
        y = F.linear(xf, w, None if bias is None else bias.float()).to(x.dtype)
        return y if out is None else out.copy_(y)
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    b = None if bias is None or bias.dtype == torch.float32 else bias.float()
    b = bias if b is None else b
    o = out if direct else None
    if act == "int8":
        y = mod.gemm_a8(x2, packed.data, packed.ggml_type, n, k, b, o)
    elif act == "int16":
        y = mod.gemm_a16(x2, packed.data, packed.ggml_type, n, k, b, o)
    elif act == "bf16x3":
        y = mod.gemm_bf3(x2, packed.data, packed.ggml_type, n, k, b, o)
    else:
        y = mod.gemm(x2, packed.data, packed.ggml_type, n, k, b, SMALL_M[use] if small_m is None else small_m, o)
    if direct:
        return y
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], n)
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    return y if out is None else out.copy_(y)


_A8_IDS = frozenset(int(t.qt) for t in _TYPES.values() if t.a8)
ACTS = ("fp32", "int8", "int16", "bf16x3")


def _bf3_ready(mod: ModuleType) -> bool:
    ready = getattr(mod, "bf3_ready", None)
    return bool(ready is not None and ready())


def bf16x3_available(path: str | None = None) -> bool:
    """Whether ``act="bf16x3"`` runs on ``path`` (None: :func:`cpu_path`): the AMX build, built with
    AMX-BF16 and granted the tile state. Its types are :func:`supported_types` ("int8")."""
    _, mod = native_for(path)
    return mod is not None and _bf3_ready(mod)


INT16_FAST_PATHS = ("avx2", "avx512_vnni", "avx512_amx")


def int16_fast(path: str | None = None) -> bool:
    """Whether ``act="int16"`` beats the fp32 chain on ``path`` (None: :func:`cpu_path`): the builds with
    VNNI's pair dot product (``vpdpwssd``; one Q5_0 projection at 128-2048 rows 1.56-1.85x the fp32 chain's
    speed, Zen 4, 2 threads) and the AVX2 build (``pmaddwd`` + an add on 6-row tiles of a decoded panel:
    1.1-1.25x at 16-512 rows for Q8_0 / Q4_1 / Q5_0, Zen 3, one thread; 0.7-0.8x before those tiles). Not
    the AVX-512 build without VNNI (0.73-0.90x on a Zen 4; its tiles were not re-measured)."""
    return (path or cpu_path()) in INT16_FAST_PATHS


def _raise_bad_input(x: object, packed: GGUFPacked, bias: torch.Tensor | None, act: str) -> None:
    n, k = packed.shape
    label = f"{packed.name or 'weight'!r} ({packed.type_name}, {n}x{k})"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{label}: x must be a floating-point tensor, got "
                         f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"{label}: x has shape {tuple(x.shape)}; its last dimension must be in_features = {k}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(f"{label}: bias has shape {tuple(bias.shape)}, expected ({n},)")
    if act not in ACTS:
        raise ValueError(f"{label}: act must be one of {', '.join(ACTS)}, got {act!r}")
    raise ValueError(f"{label}: no {'int8-activation' if act == 'int8' else act} kernel for {packed.type_name} (types: "
                     f"{', '.join(supported_types('int8'))}); use act='fp32'")


def gguf_embedding(ids: torch.Tensor, packed: GGUFPacked) -> torch.Tensor:
    """Rows ``ids`` of the packed weight as fp32 ``[*ids.shape, K]`` (an embedding lookup on a tied
    output layer without a second copy of the table): only the 16-row panels holding the ids are
    decoded, to exactly ``gguf.quants.dequantize``'s values."""
    n, k = packed.shape
    if ids.dtype not in (torch.int32, torch.int64) or (ids.numel() and (ids.min() < 0 or ids.max() >= n)):
        raise ValueError(f"{packed.name or 'embedding'!r} ({packed.type_name}, {n}x{k}): ids must be integers "
                         f"in [0, {n})")
    flat = ids.reshape(-1).long().cpu()
    panels, inv = torch.unique(flat // LANES, return_inverse=True)
    sub = GGUFPacked(packed.ggml_type, (panels.numel() * LANES, k), packed.data[panels].contiguous())
    rows = dequantize_packed(sub).reshape(panels.numel(), LANES, k)
    return rows[inv, flat % LANES].reshape(*ids.shape, k)


def _quantize_act(x: torch.Tensor, qmax: float) -> torch.Tensor:
    m, k = x.shape
    xb = x.float().reshape(m, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    cq = torch.full_like(amax, qmax)  # elementwise true divisions, as the kernel does them
    inv = torch.where(amax > 0, cq / amax, torch.zeros_like(amax))
    xq = torch.round(xb * inv)
    return (xq.double() * (amax / cq).double()).float().reshape(m, k)


def quantize_act_int8(x: torch.Tensor) -> torch.Tensor:
    """What the int8 mode computes with: ``x [M, K]`` (K a multiple of 32) quantized per row and 32 k
    (scale amax / 127, round half to even) and dequantized again, fp32."""
    return _quantize_act(x, 127.0)


def quantize_act_int16(x: torch.Tensor) -> torch.Tensor:
    """What the int16 mode computes with: ``x [M, K]`` quantized per row and 32 k (scale amax / 32767,
    round half to even) and dequantized again, fp32."""
    return _quantize_act(x, 32767.0)


_QUANT_ACT = {"int8": quantize_act_int8, "int16": quantize_act_int16}


@dataclass(frozen=True)
class KernelTable:
    """The panel-level GGUF kernels of one native build, for a caller that runs its own threads (the
    fused decode step): ``capsule`` holds csrc/gguf_kernels.h's ``KernelTable``; ``small_m`` is the
    row count up to which :func:`gguf_linear` takes the register tiles on that path."""

    path: str
    capsule: object
    small_m: int


def native_for(path: str | None = None) -> tuple[str, ModuleType | None]:
    """``path`` (None: :func:`cpu_path`) and its native module, None on the reference path."""
    use = cpu_path() if path is None else path
    return use, native_module(use) if use in PATHS else None


def kernel_table(path: str | None = None) -> KernelTable | None:
    """The kernels :func:`gguf_linear` runs by default (``path`` None: :func:`cpu_path`), or None on
    the torch reference path (no native build: nothing to share)."""
    use, mod = native_for(path)
    if mod is None:
        return None
    return KernelTable(use, mod.kernel_table(), SMALL_M[use])


def native_dequantize(packed: GGUFPacked, path: str | None = None) -> torch.Tensor:
    """The packed weight as fp32 ``[N, K]`` decoded by the native kernels' own decoder (tests)."""
    _, mod = native_for(path)
    if mod is None:
        return dequantize_packed(packed)
    n, k = packed.shape
    return mod.dequant(packed.data, packed.ggml_type, n, k)

