"""Quantized linear: native dispatch + plain-torch reference for every weight format.

``linear(x, qw, bias)`` computes ``x @ W.T + bias`` for a packed :class:`QuantizedWeight`:

* native (``llmopt_qgemm`` extension, AVX2/FMA/F16C, CPU fp32 activations):
    - M <= ``LARGE_M`` rows: fused kernel that decodes weights in registers, reuses every decoded
      8-weight vector across a tile of up to 4 activation rows, OpenMP over output columns;
    - M > ``LARGE_M`` (prefill): decode a chunk of weight rows (``CHUNK_BYTES`` of fp32, a reused
      per-thread buffer) with the native decoder and call torch's fp32 GEMM (MKL) on it; measured
      faster than the fused kernel from M ~ 64-128 on (the fused kernel's activation tile no longer
      fits L2), see benchmarks/bench_qlinear.py;
    - w8a8: own int8 kernel for every M (dynamic per-token activation quantization);
    - w4a8: own int4 x int8 kernel for every M (dynamic per-token, per-group activation
      quantization; integer group dot products, float scale/min per group).
* reference (any device, any shape): ``dequantize`` then ``F.linear``; for w8a8 the exact
  integer emulation (per-token int8 activations, int products summed exactly in float64); for
  w4a8 the dequantized int8 activations times the int4 weights plus the exact min term.

The native path is used when the extension builds (``LLMOPT_NATIVE`` != 0, AVX2 present), ``x``
is on CPU, and the format/group size has a kernel; otherwise the reference is used silently.

Activation precision of ``int4`` (``act``): "fp32" = the exact weight-only kernel above; "int8" =
the w4a8 integer kernel run directly on the int4 layout (activations quantized per token and per
weight group to int8 like llama.cpp's Q4 x Q8; group size a multiple of 64). ``INT4_ACT``
(``KernelSettings.int4_act``, env override ``LLMOPT_INT4_ACT``, "int8" or "fp32") is what ``linear`` uses for int4 when ``act`` is not
given: with "int8", rows M <= ``INT4_A8_MAX_M`` (decode, small batches) use the integer kernel and
larger M (prefill) keep the exact dequant + fp32 GEMM path. See ``_int4_uses_a8``.

Default INT4_ACT = "int8" (an explicit choice, like llama.cpp's Q4 x Q8 on CPU). Measured on
SmolLM2-135M-Instruct, int4 g64 RTN, int8 g64 lm_head (ppl: 10 pydoc topics, 4236 tokens,
/tmp script equivalent to ``llmopt eval --suite ppl --n 10``): ppl 17.23 with exact activations,
17.85 (+3.6%) with int8 activations at *every* M (an upper bound: the engine quantizes activations
only at decode, prefill/scoring stay exact); float model 12.82. Speed: decode CPU time per step
(1 thread) 10.9 -> 9.4 ms at 1 sequence, 78 -> 60 ms at 16 sequences; per GEMV 1.4-1.7x faster
than the exact kernel. ``KernelSettings(int4_act="fp32")`` (or ``LLMOPT_INT4_ACT=fp32``) gives exact int4.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F

from llmopt.formats.layouts import FORMATS, QuantizedWeight, codes, dequantize
from llmopt.formats.rtn import quantize_activations_int8, quantize_activations_int8_grouped

from .build import native_enabled

__all__ = [
    "native_module",
    "native_available",
    "supports_native",
    "linear",
    "reference_linear",
    "native_linear",
    "dequantize_native",
    "LARGE_M",
    "INT4_ACT",
    "make_forward",
    "configure",
]

_FMT_ID = {"int4": 0, "int8": 1, "int3": 2, "int2": 3, "fp8": 4, "fp4": 5}

# The dispatch policy. These are the defaults of ``llmopt.config.KernelSettings``; the engine sets
# them from its settings with :func:`configure` (process-wide: the hot path reads them per call).
LARGE_M = 64
INT4_ACT = "int8"
INT4_A8_MAX_M = 64
# From TILE_MIN_M rows, with at most TILE_MAX_K input features, the int4 x int8 path runs 4-column
# tiles (csrc/w4a8.h: each weight block decoded once for two rows, four columns reduced in one
# vector). One thread, tiles vs the column kernel, M = 4 / 16 / 64: 576x1536 (K x N) 1.59x / 1.38x /
# 1.73x; 1536x576 1.05x / 1.02x / 0.89x; 8192x2048 0.89x / 0.89x / 1.10x; 2048x8192 0.76x / 0.87x /
# 1.29x. They read fp16 scales / mins interleaved by 4 columns: a copy (1/8 of the int4 codes'
# bytes) made at the first such call. KernelSettings.decode_tiles=False (env LLMOPT_DECODE_TILES=0)
# turns them off here and in the decode step.
TILE_MIN_M = 4
TILE_MAX_K = 1024
TILES = True


def configure(int4_act: str = "int8", int4_a8_max_m: int = 64, large_m: int = 64, tiles: bool = True) -> None:
    """Set the dispatch policy (``llmopt.config.KernelSettings`` fields ``int4_act``,
    ``int4_a8_max_m``, ``large_m``, ``decode_tiles``). Applies to every quantized linear in the
    process from its next call."""
    global INT4_ACT, INT4_A8_MAX_M, LARGE_M, TILES
    if int4_act not in ("int8", "fp32"):
        raise ValueError(f"int4_act must be 'int8' or 'fp32', got {int4_act!r}")
    INT4_ACT, INT4_A8_MAX_M, LARGE_M, TILES = int4_act, int(int4_a8_max_m), int(large_m), bool(tiles)
CHUNK_BYTES = 8 << 20  # fp32 bytes of weight decoded per chunk on the large-M path (L2/L3 sized)
CHUNK_N = None  # fixed rows per chunk (tests); None -> from CHUNK_BYTES

_ws = threading.local()  # per-thread decode workspace (avoids page-faulting a fresh buffer per call)


def _workspace(rows: int, k: int) -> torch.Tensor:
    buf = getattr(_ws, "buf", None)
    if buf is None or buf.numel() < rows * k:
        buf = torch.empty(rows * k, dtype=torch.float32)
        _ws.buf = buf
    return buf[: rows * k].view(rows, k)


_tile_params_cache: dict[int, tuple] = {}  # id(scales) -> (ref, version, mins ref, version, scales4, mins4)


def interleaved_scales(qw: QuantizedWeight) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """fp16 scales / mins of an int4 weight interleaved by 4 columns (``[N/4, G, 4]``), what the
    4-column tiles read (``w4a8_gemm``'s ``scales4`` / ``mins4``, the fused decode step), or
    (None, None) if they cannot run it (N % 4, group < 64, not fp16).

    One copy per weight, shared by both users: cached per scales tensor and rebuilt when the scales
    or mins tensor is replaced or written in place (tensor version counters)."""
    n, k = qw.shape
    sc, mn = qw["scales"], qw.tensors.get("mins")
    if mn is None or sc.dtype != torch.float16 or mn.dtype != torch.float16 or n % 4 or qw.group_size < 64:
        return None, None
    key = id(sc)
    hit = _tile_params_cache.get(key)
    if hit is not None and hit[0]() is sc and hit[1] == sc._version and hit[2]() is mn and hit[3] == mn._version:
        return hit[4], hit[5]
    g = k // qw.group_size
    sc4 = sc.reshape(n // 4, 4, g).transpose(1, 2).contiguous()
    mn4 = mn.reshape(n // 4, 4, g).transpose(1, 2).contiguous()
    def _drop(_r: object, key: int = key) -> None:  # the cache entry goes with the scales tensor
        _tile_params_cache.pop(key, None)

    ref = weakref.ref(sc, _drop)
    _tile_params_cache[key] = (ref, sc._version, weakref.ref(mn), mn._version, sc4, mn4)
    return sc4, mn4


def _tile_params(qw: QuantizedWeight, m: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(scales4, mins4) for an ``m``-row int4 x int8 product where the tiles pay off, else (None, None)."""
    if not TILES or m < TILE_MIN_M or qw.shape[1] > TILE_MAX_K:
        return None, None
    return interleaved_scales(qw)


_mod = None
_tried = False


def native_module():
    """The compiled extension, or None (built lazily, once per process)."""
    global _mod, _tried
    if not _tried:
        from .build import load_extension

        _mod = load_extension("llmopt_qgemm", ["qgemm.cpp"])
        _tried = True
    return _mod


def native_available() -> bool:
    return native_enabled() and native_module() is not None


# group sizes with a native kernel (mirror of run_float's dispatch in csrc/qgemm.cpp):
# in-block group sizes, "any multiple of the block", per-channel (G == 1 with gs == K)
_NATIVE_GS = {
    "int4": ((32, 64), True, False),
    "int3": ((32, 64, 128), True, False),
    "int2": ((32, 64, 128), True, False),
    "int8": ((32,), True, True),
    "fp8": ((), False, True),
    "fp4": ((32,), False, False),
}


def supports_native(qw: QuantizedWeight) -> bool:
    """True if a native kernel exists for this format + group size (independent of the build)."""
    if qw.fmt == "w8a8":
        return True
    if qw.fmt == "w4a8":
        return qw.group_size in (32, 64, 128, 256)
    if qw.fmt not in _NATIVE_GS:
        return False
    n, k = qw.shape
    gs = qw.group_size
    inblock, any_block, per_channel = _NATIVE_GS[qw.fmt]
    if per_channel and gs == k:
        return True
    if gs in inblock:
        return True
    return any_block and gs % FORMATS[qw.fmt].block == 0


def a8_capable(qw: QuantizedWeight) -> bool:
    """int4 weights the w4a8 integer kernel can read in place (whole-block groups)."""
    return qw.fmt == "int4" and qw.group_size in (64, 128, 256)  # the w4a8 kernel's group sizes


def _int4_uses_a8(qw: QuantizedWeight, m: int, act: str | None) -> bool:
    """Whether an int4 product with ``m`` activation rows quantizes the activations to int8."""
    if qw.fmt != "int4":
        return False
    if act is None:
        return INT4_ACT == "int8" and m <= INT4_A8_MAX_M and a8_capable(qw)
    if act not in ("int8", "fp32"):
        raise ValueError(f"act must be 'int8' or 'fp32', got {act!r}")
    if act == "int8" and not a8_capable(qw):
        raise ValueError(f"int4 with int8 activations needs a group size multiple of 64 (<= 256), "
                         f"got {qw.group_size}")
    return act == "int8"


def reference_linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                     act: str | None = None) -> torch.Tensor:
    """Plain-torch reference (device-agnostic). ``x [..., K]`` -> ``[..., N]`` in x's dtype.

    ``act`` (int4 only): "int8" emulates the integer-activation kernel, "fp32" is exact; None
    follows the same policy as :func:`linear` (``INT4_ACT`` / ``INT4_A8_MAX_M``)."""
    n, k = qw.shape
    if _int4_uses_a8(qw, x.numel() // max(k, 1), act):
        return _reference_a8(x, qw, bias)
    if qw.fmt == "w8a8":
        xf = x.float()
        xq, sx = quantize_activations_int8(xf)
        wq = qw["qweight"][:, :k]
        acc = xq.double() @ wq.double().t()  # exact integer sums
        y = (acc * (sx.double() * qw["scales"].double().reshape(1, n))).float()
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)
    if qw.fmt == "w4a8":
        return _reference_a8(x, qw, bias)
    w = dequantize(qw).to(x.device)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def _reference_a8(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """int4-coded weights (w4a8 or int4 layout) x per-token, per-group int8 activations."""
    n, k = qw.shape
    gs = qw.group_size
    xf = x.float()
    xq, sx = quantize_activations_int8_grouped(xf, gs)
    xhat = (xq.float().reshape(*xq.shape[:-1], k // gs, gs) * sx.unsqueeze(-1)).reshape(xq.shape)
    q = codes(qw).float().reshape(n, k // gs, gs)
    wq = (q * qw["scales"].float().unsqueeze(-1)).reshape(n, k)  # weight part without the mins
    xsum = xf.reshape(*xf.shape[:-1], k // gs, gs).sum(-1)  # exact activation sums for the mins
    y = F.linear(xhat, wq) + xsum @ qw["mins"].float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def dequantize_native(qw: QuantizedWeight, n0: int = 0, n1: int | None = None) -> torch.Tensor:
    """Native decode of rows ``[n0, n1)`` to fp32 (falls back to the reference)."""
    n, k = qw.shape
    n1 = n if n1 is None else n1
    mod = native_module()
    if mod is None or qw.fmt not in _FMT_ID or not supports_native(qw) or qw["qweight"].device.type != "cpu":
        return dequantize(qw)[n0:n1]
    return mod.dequant(_FMT_ID[qw.fmt], qw["qweight"], qw["scales"], qw.tensors.get("mins"), n, k,
                       qw.group_size, n0, n1)


def native_linear(x2: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None, mod,
                  act: str | None = None) -> torch.Tensor:
    """Native path on a 2-D fp32 CPU ``x2 [M, K]`` (``act``: see :func:`linear`)."""
    n, k = qw.shape
    m = x2.shape[0]
    if qw.fmt == "w8a8":
        return mod.w8a8_gemm(x2, qw["qweight"], qw["scales"], bias)
    if qw.fmt == "w4a8":
        return mod.w4a8_gemm(x2, qw["qweight"], qw["scales"], qw["mins"], qw.group_size, bias)
    if _int4_uses_a8(qw, m, act):
        return mod.w4a8_gemm(x2, qw["qweight"], qw["scales"], qw["mins"], qw.group_size, bias, 1,
                             *_tile_params(qw, m))
    if m > LARGE_M:
        # prefill: decode a chunk of weight rows to fp32 (cache-sized, reused buffer) + fp32 GEMM
        chunk = CHUNK_N or (n if 4 * n * k <= CHUNK_BYTES else max(16, CHUNK_BYTES // (4 * k) // 16 * 16))
        mins = qw.tensors.get("mins")
        out = torch.empty(m, n, dtype=torch.float32)
        for n0 in range(0, n, chunk):
            n1 = min(n, n0 + chunk)
            w = mod.dequant(_FMT_ID[qw.fmt], qw["qweight"], qw["scales"], mins, n, k, qw.group_size, n0, n1,
                            _workspace(n1 - n0, k))
            if n1 - n0 == n:  # one chunk: write straight into the output
                if bias is None:
                    torch.mm(x2, w.t(), out=out)
                else:
                    torch.addmm(bias, x2, w.t(), out=out)
            elif bias is None:
                out[:, n0:n1] = x2 @ w.t()
            else:
                out[:, n0:n1] = torch.addmm(bias[n0:n1], x2, w.t())
        return out
    return mod.qgemm(x2, _FMT_ID[qw.fmt], qw["qweight"], qw["scales"], qw.tensors.get("mins"), n, k,
                     qw.group_size, bias)


def linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None,
           backend: str = "auto", act: str | None = None) -> torch.Tensor:
    """``x [..., K] @ W.T + bias`` -> ``[..., N]`` (output dtype = x dtype).

    ``backend``: "auto" (native when possible), "native" (error if impossible), "reference".
    ``act`` (int4 only): "fp32" exact activations, "int8" per-group int8 activations (w4a8
    kernel on the int4 layout), None = module policy ``INT4_ACT`` for M <= ``INT4_A8_MAX_M``.
    """
    n, k = qw.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {k}")
    if backend == "reference":
        return reference_linear(x, qw, bias, act)
    if backend == "auto" and x.requires_grad and torch.is_grad_enabled():
        # autograd-capable path (native kernels are inference-only); int4 stays exact (the int8
        # activation rounding has no useful gradient)
        return reference_linear(x, qw, bias, act or ("fp32" if qw.fmt == "int4" else None))
    mod = native_module() if (x.device.type == "cpu" and native_enabled()) else None
    ok = mod is not None and supports_native(qw) and qw["qweight"].device.type == "cpu"
    if not ok:
        if backend == "native":
            raise RuntimeError(f"no native kernel for {qw.fmt} (group {qw.group_size}) on {x.device}")
        return reference_linear(x, qw, bias, act)
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    b = bias
    if b is not None and b.dtype != torch.float32:
        b = b.float()
    y = native_linear(x2, qw, b, mod, act)  # inference only: no autograd through the native kernels
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], n)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def make_forward(qw: QuantizedWeight, bias: torch.Tensor | None = None):
    """A ``x -> linear(x, qw, bias)`` callable with the dispatch decided once (QuantLinear's hot
    path: ~1/3 of the Python overhead per call of ``linear``). Inputs it does not cover (non-CPU,
    non-fp32, autograd, no native kernel) go through :func:`linear`."""
    mod = native_module() if native_enabled() else None
    if mod is None or not supports_native(qw) or qw["qweight"].device.type != "cpu":
        return lambda x: linear(x, qw, bias)
    n, k = qw.shape
    fmt, gs = qw.fmt, qw.group_size
    qweight, scales, mins = qw["qweight"], qw["scales"], qw.tensors.get("mins")
    b = None if bias is None else bias.float().contiguous()
    a8_ok = fmt == "int4" and a8_capable(qw)
    fmt_id = _FMT_ID.get(fmt)

    def fwd(x: torch.Tensor) -> torch.Tensor:
        if (x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[1] != k
                or (x.requires_grad and torch.is_grad_enabled()) or not x.is_contiguous()):
            return linear(x, qw, bias)
        m = x.shape[0]
        if a8_ok and m <= INT4_A8_MAX_M and INT4_ACT == "int8":  # policy read per call (tests flip it)
            return mod.w4a8_gemm(x, qweight, scales, mins, gs, b, 1, *_tile_params(qw, m))
        if fmt_id is None or m > LARGE_M:
            return native_linear(x, qw, b, mod, "fp32" if fmt == "int4" else None)
        return mod.qgemm(x, fmt_id, qweight, scales, mins, n, k, gs, b)

    return fwd
