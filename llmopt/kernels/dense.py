"""fp32 linear on a pre-packed weight for small-M (decode) GEMM: ``PackedLinear`` + ``pack_linears``.

torch's sgemv/sgemm on the ``nn.Linear`` weight streams weights far below memory bandwidth for a
handful of activation rows and re-packs the weight on every batched call. ``llmopt_sgemm``
(csrc/sgemm.cpp) packs the weight once into 16-row panels interleaved along K (layout table in the
C++ file: ``packed[p][k][j] = W[16 p + j][k]``, float32 ``[ceil(N/16), K, 16]``, zero padded) and
runs a register-blocked AVX2/FMA micro-kernel (up to 6 rows x 16 columns of accumulators) over it,
OpenMP-split over panels, bias fused.

* ``pack_weight(w)`` / ``unpack_weight(packed, n)``: the layout (native pack, torch reference).
* ``packed_linear(x, packed, n, bias)``: native kernel, ``packed_linear_ref`` its torch twin.
* ``PackedLinear``: drop-in ``nn.Linear`` replacement that keeps the weight only packed (no second
  copy): native kernel for CPU float32 inputs at every row count, ``packed_linear_ref`` otherwise.
  No row threshold: measured with benchmarks/bench_sgemm.py (SmolLM2-135M shapes, weights cycled
  from DRAM, single thread, CPU time), the packed kernel beat ``F.linear`` (MKL) at every M tried,
  1..1024: x1.8-3.8 at M=1..16, x1.4-1.7 at M=64, x1.2-1.4 at M=256..1024 (MKL tops out at
  ~95 GFLOPS/core here, the AVX2 6x16 kernel at ~117). ``.weight`` unpacks on access.
* ``pack_linears(model, skip=())``: swap every float32 ``nn.Linear`` in place.
* ``kernel_table()``: the kernel's panel-level entry point as a capsule (csrc/dense_kernels.h), so the
  fused decode step runs the very kernel ``PackedLinear`` runs.

``LLMOPT_NATIVE=0`` (or a failed build) makes everything use ``F.linear``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .build import load_extension, native_enabled

__all__ = [
    "PANEL",
    "native_module",
    "native_available",
    "kernel_table",
    "pack_weight",
    "pack_weight_ref",
    "unpack_weight",
    "pack_add_lowrank",
    "packed_linear",
    "packed_linear_ref",
    "PackedLinear",
    "pack_linears",
]

PANEL = 16  # output rows per packed panel (csrc/sgemm.cpp: PW)

_UNSET = object()
_ext = _UNSET


def native_module():
    """The compiled ``llmopt_sgemm`` extension, or None (built once, on first use)."""
    global _ext
    if not native_enabled():
        return None
    if _ext is _UNSET:
        _ext = load_extension("llmopt_sgemm", ["sgemm.cpp"])
    return _ext


def native_available() -> bool:
    return native_module() is not None


def kernel_table() -> object | None:
    """The packed GEMM's panel kernel (csrc/dense_kernels.h ``KernelTable``) as a capsule, for a caller
    that runs its own threads (the fused decode step), or None without the native extension."""
    mod = native_module()
    return None if mod is None else mod.kernel_table()


# ---- layout ------------------------------------------------------------------------------------

def pack_weight_ref(w: torch.Tensor) -> torch.Tensor:
    """Torch reference of the packing: ``[N, K] -> [ceil(N/16), K, 16]`` (zero padded rows)."""
    if w.dim() != 2:
        raise ValueError(f"pack_weight: expected a 2-D [out_features, in_features] weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    p = (n + PANEL - 1) // PANEL
    if p * PANEL != n:
        w = torch.cat([w, w.new_zeros(p * PANEL - n, k)])
    return w.reshape(p, PANEL, k).transpose(1, 2).contiguous()


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """Pack a float32 ``[N, K]`` weight into panels (native on CPU, else the torch reference)."""
    w = w.detach()
    mod = native_module()
    if mod is not None and w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2 and w.shape[0] > 0:
        return mod.pack(w)
    return pack_weight_ref(w)


def unpack_weight(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_weight`: ``[P, K, 16] -> [n, K]`` (a new contiguous tensor)."""
    p, k, pw = packed.shape
    if pw != PANEL or not (p - 1) * PANEL < n <= p * PANEL:
        raise ValueError(f"unpack_weight: packed shape {tuple(packed.shape)} does not hold {n} rows")
    return packed.transpose(1, 2).reshape(p * PANEL, k)[:n].contiguous()


def pack_add_lowrank(packed: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """``pack_weight(W + scale * b @ a)`` from ``packed = pack_weight(W)`` (``b`` ``[N, r]``, ``a``
    ``[r, K]``: a LoRA update), a new tensor: one batched GEMM straight into the panel layout
    (panel ``p`` gets ``a.T @ b[16 p : 16 p + 16].T``), without the three ``[N, K]`` intermediates of
    merging then packing (~2.5x faster at SmolLM2's shapes). Zero-padded rows stay zero."""
    p, k, pw = packed.shape
    n, r = b.shape
    if pw != PANEL or a.shape != (r, k) or not (p - 1) * PANEL < n <= p * PANEL:
        raise ValueError(f"pack_add_lowrank: b {tuple(b.shape)} @ a {tuple(a.shape)} does not fit the packed weight "
                         f"{tuple(packed.shape)}")
    b = b.to(packed.dtype)
    if n != p * PANEL:
        b = torch.cat([b, b.new_zeros(p * PANEL - n, r)])
    bt = b.reshape(p, PANEL, r).transpose(1, 2)  # [P, r, 16]
    return torch.baddbmm(packed, a.to(packed.dtype).t().expand(p, k, r), bt, alpha=scale)


# ---- op ----------------------------------------------------------------------------------------

def packed_linear_ref(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference: ``x @ unpack(packed).T + bias`` (any device / dtype / leading dims)."""
    return F.linear(x, unpack_weight(packed, n).to(x.dtype), None if bias is None else bias.to(x.dtype))


def _native_ok(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if x.device.type != "cpu" or packed.device.type != "cpu":
        return False
    if x.dtype != torch.float32 or packed.dtype != torch.float32:
        return False
    if bias is not None and (bias.device.type != "cpu" or bias.dtype != torch.float32):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return True


def packed_linear(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` given packed; ``x`` is ``[..., K]``. Native kernel for CPU float32
    inputs (no autograd), :func:`packed_linear_ref` otherwise."""
    mod = native_module()
    if mod is None or not _native_ok(x, packed, bias):
        return packed_linear_ref(x, packed, n, bias)
    k = packed.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"packed_linear: x has {x.shape[-1]} features, the weight expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = mod.gemm(x2, packed, n, bias)
    return y.view(*lead, n)


# ---- module ------------------------------------------------------------------------------------

class PackedLinear(nn.Module):
    """``nn.Linear`` replacement that holds its weight only in the packed layout (one copy).

    * ``forward``: the native kernel for CPU float32 inputs without autograd, at every row count
      (it measured faster than ``F.linear`` from 1 up to 1024 rows, see the module docstring);
      otherwise :func:`packed_linear_ref` (unpacks the weight per call: correct on any device /
      dtype, slower; moving / casting the module moves / casts the packed buffer).
    * ``weight``: a property returning the unpacked ``[out, in]`` weight as a *new* tensor (reads
      work; in-place writes to it do not reach the layer). Assigning ``module.weight = w`` (e.g.
      re-tying an lm_head to an embedding) re-packs ``w``.
    * ``state_dict`` keys are those of ``nn.Linear`` (``weight`` unpacked, ``bias``); loading a
      ``weight`` re-packs it, so checkpoints stay interchangeable with the unpacked model.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dim() != 2 or weight.shape[0] == 0:
            raise ValueError(f"PackedLinear: weight must be a non-empty [out_features, in_features] matrix, "
                             f"got shape {tuple(weight.shape)}")
        self._setup(pack_weight(weight.detach()), int(weight.shape[0]), bias)

    def _setup(self, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> None:
        self.out_features, self.in_features = out_features, int(packed.shape[1])
        self.register_buffer("packed", packed, persistent=False)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"PackedLinear: bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            # inference module: the weight has no gradient either; shares storage with the original
            bias = nn.Parameter(bias.detach(), requires_grad=False)
        self.register_parameter("bias", bias)  # None allowed: forward reads self._parameters["bias"]

    @classmethod
    def from_packed(cls, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None) -> PackedLinear:
        """A module on a weight already in the packed layout (``pack_weight``'s; kept, not copied)."""
        p = packed.shape[0] if packed.dim() == 3 else 0
        if packed.dim() != 3 or packed.shape[2] != PANEL or not (p - 1) * PANEL < out_features <= p * PANEL:
            raise ValueError(f"PackedLinear.from_packed: shape {tuple(packed.shape)} is not the packed layout of "
                             f"{out_features} output rows ([ceil(out / {PANEL}), in, {PANEL}])")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod._setup(packed, int(out_features), bias)
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        """Pack ``linear`` (the weight is copied into the packed layout; the bias shares its storage)."""
        return cls(linear.weight, linear.bias)

    # -- weight view / assignment ------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return unpack_weight(self.packed, self.out_features)

    def __setattr__(self, name, value):
        if name == "weight":
            self.set_weight(value)
            return
        super().__setattr__(name, value)

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Replace the weight (same shape) by packing ``weight``."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"PackedLinear: new weight has shape {tuple(weight.shape)}, expected "
                             f"{(self.out_features, self.in_features)}")
        self.packed = pack_weight(weight.detach())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key]
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: checkpoint {tuple(w.shape)}, model "
                                  f"{(self.out_features, self.in_features)}")
            else:
                self.set_weight(w.to(device=self.packed.device, dtype=self.packed.dtype))
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}  # bias etc.: the default handling
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fast path (decode: ~2 us of Python per call instead of ~5 through packed_linear)
        mod: Any = _ext if _ext is not _UNSET else native_module()
        p: torch.Tensor = self._buffers["packed"]  # type: ignore[assignment]
        b = self._parameters["bias"]
        if (mod is not None and x.dim() == 2 and x.dtype == torch.float32 and p.dtype == torch.float32
                and x.device.type == "cpu" and p.device.type == "cpu" and x.is_contiguous()
                and (b is None or (b.dtype == torch.float32 and b.device.type == "cpu"))
                and not (x.requires_grad and torch.is_grad_enabled()) and native_enabled()):
            if x.shape[1] != self.in_features:
                raise ValueError(f"PackedLinear: x has {x.shape[1]} features, expected {self.in_features}")
            return mod.gemm(x, p, self.out_features, b)
        return packed_linear(x, p, self.out_features, b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"packed={tuple(self.packed.shape)}")


def pack_linears(model: nn.Module, skip=()) -> int:
    """Replace (in place) every CPU float32 ``nn.Linear`` whose qualified name contains none of the
    ``skip`` substrings by a :class:`PackedLinear`; returns how many were replaced.

    The weight then lives only in the packed layout (the old ``nn.Linear`` weight is released unless
    something else holds it). A tied lm_head: the embedding keeps its Parameter and keeps working;
    the lm_head gets its own packed copy (one extra copy of the embedding matrix). Without the
    native extension (``LLMOPT_NATIVE=0``, failed build) nothing is replaced and 0 is returned.
    """
    if not native_available():
        return 0
    skip = tuple(skip or ())
    targets = [name for name, mod in model.named_modules()
               if type(mod) is nn.Linear and mod.weight.dtype == torch.float32 and mod.weight.device.type == "cpu"
               and not any(s in name for s in skip)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear.from_linear(getattr(parent, child)))
    return len(targets)
