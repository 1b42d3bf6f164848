"""Weight formats: definitions, packing into the native kernel layouts, and plain-torch
references (quantize / dequantize).

A weight ``W`` is ``[N, K]`` (``N`` = out_features, ``K`` = in_features, as ``nn.Linear``).
Quantization is per row (output channel) and, for grouped formats, per group of ``group_size``
consecutive input features. ``K`` must be a multiple of ``group_size`` for grouped formats.

Block layouts (``k`` = input index inside one output row; all multi-byte lanes little-endian;
``Kp`` = ``K`` rounded up to the block size, padding codes are 0 and never contribute because the
kernels zero-pad the activations):

===========  =====  =======================================================  ==========================
fmt          block  ``qweight`` bytes per block (row ``n`` = blocks in k order)  per-group params
===========  =====  =======================================================  ==========================
int4 (asym)    64   32 B = 8 x uint32 lanes ``L[l]``; weight ``k = 8*j + l``     ``scales``, ``mins``
                    is nibble ``j`` of lane ``l`` (bits ``4j..4j+3``), j=0..7     ``[N, K/gs]`` fp16|fp32
int2 (asym)   128   32 B = 8 x uint32 lanes; ``k = 8*j + l`` is bits ``2j..2j+1``  ``scales``, ``mins``
                    of lane ``l``, j=0..15
int3 (asym)   128   48 B = the int2 block of the low 2 bits (32 B) followed by     ``scales``, ``mins``
                    8 x uint16 lanes ``H[l]`` (16 B): bit ``j`` of ``H[l]`` is bit 2
                    of weight ``k = 8*j + l``
int8 (sym)     32   32 B natural order int8 (``q`` in [-127, 127])                ``scales`` (per group
                                                                                  or per channel)
fp8 (e4m3)     32   32 B natural order float8_e4m3fn bit patterns                 ``scales`` fp32 ``[N]``
fp4 (MXFP4)    64   as int4; nibble = e2m1 code (bit 3 sign, 2 exp bits, 1 mant)  ``scales`` uint8 E8M0
                                                                                  ``[N, K/32]``
w8a8           32   32 B natural order int8 (``q`` in [-127, 127])                ``scales`` fp32 ``[N]``
w4a8 (asym)    64   32 B, byte ``i`` = ``q[i] | q[i+32] << 4`` (ggml Q4 order:    ``scales``, ``mins``
                    low nibbles = weights 0..31, high = 32..63)
===========  =====  =======================================================  ==========================

Decoding rule (reference): ``w[n, k] = q * scale[n, g] + min[n, g]`` for the asymmetric integer
formats (``q`` in ``[0, 2**bits)``); ``q * scale`` for int8 / w8a8; ``fp8(code) * scale[n]`` for
fp8; ``e2m1(code) * 2**(e - 127)`` for fp4. ``w8a8`` additionally quantizes activations per token
to int8 at run time (see :func:`llmopt.formats.rtn.quantize_activations_int8`); ``w4a8`` stores the
same weights as int4 (asymmetric, grouped) but quantizes the activations to int8 per token *and*
per weight group at run time (``rtn.quantize_activations_int8_grouped``) so the kernel can use
integer dot products (``maddubs``) like llama.cpp's Q4 x Q8; the min term uses the exact float
activation sums. Its output error stays within a few % (relative) of int4's (+1% measured in
tests) for ~2-3x less decode work per weight than int4's exact fp32-activation kernel.

Why the "8 lanes x j" interleave: one 256-bit load of a block gives, for every ``j``, the 8
consecutive weights ``8j .. 8j+7`` as one nibble/crumb in each 32-bit lane, so an AND (or a shift
for the top field) plus an int->float convert yields 8 float lanes that line up with 8
consecutive activations. The kernels even skip the shift: ``(L & (0xF << 4j))`` converts to
``q * 16**j`` exactly, and the activations are pre-multiplied by ``16**-j`` once per call.

Bits per weight (with fp16 scale+min): int4 = w4a8 = 4 + 32/gs, int3 = 3 + 32/gs, int2 = 2 + 32/gs,
int8 = 8 + 16/gs, fp4 = 4.25, fp8 = 8 + 32/K, w8a8 = 8 + 32/K.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import rtn

__all__ = [
    "FORMATS",
    "FormatSpec",
    "QuantizedWeight",
    "quantize",
    "dequantize",
    "effective_group_size",
    "pack_lanes",
    "unpack_lanes",
]


# --------------------------------------------------------------------------------------------
# lane packing (device-agnostic)
# --------------------------------------------------------------------------------------------

def _pad_k(t: torch.Tensor, kp: int) -> torch.Tensor:
    n, k = t.shape
    if k == kp:
        return t
    return torch.cat([t, t.new_zeros(n, kp - k)], dim=1)


def _round_up(a: int, b: int) -> int:
    return (a + b - 1) // b * b


def _lanes_to_bytes(lanes: torch.Tensor, lane_bytes: int) -> torch.Tensor:
    """int64 ``[..., 8]`` lanes -> uint8 ``[..., 8 * lane_bytes]`` little-endian."""
    shifts = torch.arange(lane_bytes, device=lanes.device, dtype=torch.int64) * 8
    b = (lanes.unsqueeze(-1) >> shifts) & 0xFF
    return b.reshape(*lanes.shape[:-1], 8 * lane_bytes).to(torch.uint8)


def _bytes_to_lanes(b: torch.Tensor, lane_bytes: int) -> torch.Tensor:
    shifts = torch.arange(lane_bytes, device=b.device, dtype=torch.int64) * 8
    b = b.to(torch.int64).reshape(*b.shape[:-1], 8, lane_bytes)
    return (b << shifts).sum(dim=-1)


def pack_lanes(q: torch.Tensor, bits: int, lane_bits: int = 32) -> torch.Tensor:
    """Pack codes ``q [N, K]`` (< 2**bits) into the "8 lanes x j" layout.

    Block = ``8 * (lane_bits // bits)`` weights; weight ``k = 8*j + l`` of a block goes to bits
    ``bits*j ..`` of lane ``l``. Returns uint8 ``[N, nblocks * lane_bits]``... i.e.
    ``[N, Kp * bits / 8]``.
    """
    n, k = q.shape
    jn = lane_bits // bits
    blk = 8 * jn
    kp = _round_up(k, blk)
    qq = _pad_k(q.to(torch.int64), kp).reshape(n, kp // blk, jn, 8)
    shifts = (torch.arange(jn, device=q.device, dtype=torch.int64) * bits).view(1, 1, jn, 1)
    lanes = (qq << shifts).sum(dim=2)  # [n, nb, 8]
    return _lanes_to_bytes(lanes, lane_bits // 8).reshape(n, -1)


def unpack_lanes(p: torch.Tensor, bits: int, k: int, lane_bits: int = 32) -> torch.Tensor:
    """Inverse of :func:`pack_lanes`: uint8 ``[N, Kp*bits/8]`` -> int64 codes ``[N, k]``."""
    n = p.shape[0]
    jn = lane_bits // bits
    lb = lane_bits // 8
    lanes = _bytes_to_lanes(p.reshape(n, -1, 8 * lb), lb)  # [n, nb, 8]
    shifts = (torch.arange(jn, device=p.device, dtype=torch.int64) * bits).view(1, 1, jn, 1)
    q = (lanes.unsqueeze(2) >> shifts) & ((1 << bits) - 1)  # [n, nb, jn, 8]
    return q.reshape(n, -1)[:, :k]


def _pack_int3(q: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    lo = pack_lanes(q & 3, 2).reshape(n, -1, 32)
    hi = pack_lanes(q >> 2, 1, lane_bits=16).reshape(n, -1, 16)
    return torch.cat([lo, hi], dim=2).reshape(n, -1)


def _unpack_int3(p: torch.Tensor, k: int) -> torch.Tensor:
    n = p.shape[0]
    blocks = p.reshape(n, -1, 48)
    lo = unpack_lanes(blocks[:, :, :32].reshape(n, -1), 2, k)
    hi = unpack_lanes(blocks[:, :, 32:].reshape(n, -1), 1, k, lane_bits=16)
    return lo | (hi << 2)


def _pack_q4_halves(q: torch.Tensor) -> torch.Tensor:
    """w4a8 layout: per 64-block, byte i = q[i] | q[i + 32] << 4 -> uint8 [N, Kp/2]."""
    n, k = q.shape
    kp = _round_up(k, 64)
    qq = _pad_k(q.to(torch.int64), kp).reshape(n, kp // 64, 2, 32)
    return (qq[:, :, 0] | (qq[:, :, 1] << 4)).to(torch.uint8).reshape(n, kp // 2)


def _unpack_q4_halves(p: torch.Tensor, k: int) -> torch.Tensor:
    n = p.shape[0]
    b = p.to(torch.int64).reshape(n, -1, 32)
    return torch.stack([b & 15, b >> 4], dim=2).reshape(n, -1)[:, :k]


# --------------------------------------------------------------------------------------------
# packed container
# --------------------------------------------------------------------------------------------

class PackedWeightSize:
    """What any packed ``[N, K]`` weight says about its size, from its ``shape`` and ``nbytes``
    (shared by :class:`QuantizedWeight` and the GGUF kernels' ``GGUFPacked``)."""

    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def bits_per_weight(self) -> float:
        """Stored bits (codes incl. block padding + scales + mins) per real weight."""
        n, k = self.shape
        return 8.0 * self.nbytes / max(1, n * k)


@dataclass
class QuantizedWeight(PackedWeightSize):
    """A packed quantized ``[N, K]`` weight: plain tensors + the metadata to interpret them.

    ``tensors`` always has ``qweight`` and ``scales``; asymmetric formats add ``mins``. All are
    plain (non-quantized-dtype) tensors, so ``safetensors`` can store them.
    """

    fmt: str
    shape: tuple[int, int]
    group_size: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device) -> QuantizedWeight:
        return QuantizedWeight(self.fmt, self.shape, self.group_size,
                               {k: v.to(device) for k, v in self.tensors.items()})

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]


@dataclass(frozen=True)
class FormatSpec:
    name: str
    bits: int
    block: int                 # weights per kernel block along K
    affine: bool               # has ``mins``
    per_channel: bool = False  # group_size is always K (ignores the requested one)
    fixed_group: int | None = None  # group_size is always this (ignores the requested one)
    doc: str = ""


FORMATS: dict[str, FormatSpec] = {
    "int4": FormatSpec("int4", 4, 64, True, doc="asymmetric 4-bit, scale+min per group"),
    "int3": FormatSpec("int3", 3, 128, True, doc="asymmetric 3-bit (2-bit plane + 1-bit plane)"),
    "int2": FormatSpec("int2", 2, 128, True, doc="asymmetric 2-bit, scale+min per group"),
    "int8": FormatSpec("int8", 8, 32, False, doc="symmetric int8 weight-only, per group or per channel"),
    "fp8": FormatSpec("fp8", 8, 32, False, per_channel=True, doc="float8 e4m3fn, fp32 scale per channel"),
    "fp4": FormatSpec("fp4", 4, 64, False, fixed_group=32, doc="MXFP4: e2m1 + E8M0 scale per 32"),
    "w8a8": FormatSpec("w8a8", 8, 32, False, per_channel=True,
                       doc="int8 weights per channel x dynamic per-token int8 activations"),
    "w4a8": FormatSpec("w4a8", 4, 64, True,
                       doc="int4 asymmetric grouped weights x dynamic per-group int8 activations"),
}


def effective_group_size(fmt: str, k: int, group_size: int | None) -> int:
    """The group size a format really uses for in_features ``k``.

    ``fp8``/``w8a8`` are per channel (``k``); ``fp4`` is 32 (MX block); ``int8`` is per channel
    when ``group_size`` is None/<=0/>=k; the low-bit integer formats use ``group_size`` (default 64).
    """
    spec = FORMATS[fmt]
    if spec.per_channel:
        return k
    if spec.fixed_group is not None:
        return spec.fixed_group
    if fmt == "int8" and (group_size is None or group_size <= 0 or group_size >= k):
        return k
    if group_size is None:
        group_size = 64
    if group_size <= 0 or group_size % 8:
        raise ValueError(f"{fmt}: group_size must be a positive multiple of 8, got {group_size}")
    if fmt == "w4a8" and group_size not in (32, 64, 128, 256):
        raise ValueError(f"w4a8: group_size must be 32, 64, 128 or 256, got {group_size}")
    return group_size


# formats whose RTN uses the per-group clipping search by default (see rtn.rtn_affine)
SEARCH_BY_DEFAULT = ("int3", "int2")


def quantize(weight: torch.Tensor, fmt: str, group_size: int | None = 64,
             scale_dtype: torch.dtype = torch.float16, search: bool | None = None) -> QuantizedWeight:
    """RTN-quantize a float ``[N, K]`` weight into the packed ``fmt`` layout.

    ``search`` (asymmetric integer formats only): per-group range-clipping search, default on for
    int3/int2 (error -15%/-28%) and off for int4 (-8% error for ~50x the quantization time).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {sorted(FORMATS)}")
    if weight.dim() != 2:
        raise ValueError("weight must be 2-D [out_features, in_features]")
    if scale_dtype not in (torch.float16, torch.float32):
        raise ValueError("scale_dtype must be torch.float16 or torch.float32")
    spec = FORMATS[fmt]
    w = weight.detach().float()
    n, k = w.shape
    gs = effective_group_size(fmt, k, group_size)
    if k % gs:
        raise ValueError(f"{fmt}: in_features={k} is not a multiple of group_size={gs}")
    t: dict[str, torch.Tensor] = {}
    if fmt in ("int4", "int2", "int3", "w4a8"):
        if search is None:
            search = fmt in SEARCH_BY_DEFAULT
        q, s, m = rtn.rtn_affine(w, spec.bits, gs, scale_dtype, search=search)
        if fmt == "int3":
            t["qweight"] = _pack_int3(q)
        elif fmt == "w4a8":
            t["qweight"] = _pack_q4_halves(q)
        else:
            t["qweight"] = pack_lanes(q, spec.bits)
        t["scales"], t["mins"] = s.contiguous(), m.contiguous()
    elif fmt == "int8":
        q, s = rtn.rtn_symmetric(w, 8, gs, scale_dtype)
        t["qweight"] = _pad_k(q, _round_up(k, 32)).contiguous()
        t["scales"] = s.contiguous()
    elif fmt == "w8a8":
        q, s = rtn.rtn_symmetric(w, 8, k, torch.float32)
        t["qweight"] = _pad_k(q, _round_up(k, 32)).contiguous()
        t["scales"] = s.reshape(n).contiguous()
    elif fmt == "fp8":
        c, s = rtn.rtn_fp8_e4m3(w)
        t["qweight"] = _pad_k(c, _round_up(k, 32)).contiguous()
        t["scales"] = s.contiguous()
    elif fmt == "fp4":
        c, e = rtn.rtn_mxfp4(w, gs)
        t["qweight"] = pack_lanes(c, 4)
        t["scales"] = e.contiguous()
    return QuantizedWeight(fmt, (n, k), gs, t)


def codes(qw: QuantizedWeight) -> torch.Tensor:
    """Unpacked integer codes ``[N, K]`` (int64) of a packed weight (for tests / inspection)."""
    n, k = qw.shape
    p = qw["qweight"]
    if qw.fmt in ("int4", "fp4"):
        return unpack_lanes(p, 4, k)
    if qw.fmt == "int2":
        return unpack_lanes(p, 2, k)
    if qw.fmt == "int3":
        return _unpack_int3(p, k)
    if qw.fmt == "w4a8":
        return _unpack_q4_halves(p, k)
    return p[:, :k].to(torch.int64)


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """Reference decode of a packed weight to fp32 ``[N, K]``."""
    n, k = qw.shape
    gs = qw.group_size
    fmt = qw.fmt
    if fmt in ("int4", "int2", "int3", "w4a8"):
        q = codes(qw).float().reshape(n, k // gs, gs)
        s = qw["scales"].float().unsqueeze(-1)
        m = qw["mins"].float().unsqueeze(-1)
        return (q * s + m).reshape(n, k)
    if fmt in ("int8", "w8a8"):
        q = qw["qweight"][:, :k].float().reshape(n, k // gs, gs)
        s = qw["scales"].float().reshape(n, -1).unsqueeze(-1)
        return (q * s).reshape(n, k)
    if fmt == "fp8":
        v = qw["qweight"][:, :k].contiguous().view(torch.float8_e4m3fn).float()
        return v * qw["scales"].float().reshape(n, 1)
    if fmt == "fp4":
        c = codes(qw)
        lut = torch.tensor(rtn.E2M1_VALUES, device=c.device, dtype=torch.float32)
        v = lut[c & 7] * torch.where((c & 8) > 0, -1.0, 1.0)
        scale = torch.exp2(qw["scales"].float() - 127.0)
        return (v.reshape(n, k // gs, gs) * scale.unsqueeze(-1)).reshape(n, k)
    raise ValueError(f"unknown format {fmt!r}")
