"""``QuantLinear``: a drop-in ``nn.Linear`` replacement holding a packed quantized weight, and
``quantize_model`` which swaps the ``nn.Linear`` modules of a model.

The state dict holds only plain tensors (``qweight``, ``scales``, optional ``mins``, optional
``bias``) so it can be written with ``safetensors``; the format name and group size are module
attributes (``fmt``, ``group_size``) that a checkpoint writer must store alongside (e.g. in the
safetensors metadata) and pass back to :meth:`QuantLinear.from_packed`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .formats import FORMATS, QuantizedWeight, dequantize, effective_group_size, quantize

log = logging.getLogger(__name__)

__all__ = ["QuantLinear", "quantize_model", "DEFAULT_SKIP"]

DEFAULT_SKIP = ("lm_head", "embed")


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored in a packed quantized format (see ``formats``)."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.fmt = qw.fmt
        self.group_size = qw.group_size
        self.out_features, self.in_features = qw.shape
        for name, t in qw.tensors.items():
            self.register_buffer(name, t.contiguous())
        self._tensor_names = tuple(qw.tensors.keys())
        if bias is not None:
            self.register_buffer("bias", bias.detach().float().contiguous())
        else:
            self.bias = None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, group_size: int = 64,
                    scale_dtype: torch.dtype = torch.float16, search: bool | None = None) -> "QuantLinear":
        """Quantize an ``nn.Linear`` (RTN). ``group_size`` is ignored by per-channel / fixed-block
        formats (fp8, w8a8: per channel; fp4: 32). ``search``: see ``formats.quantize``."""
        qw = quantize(linear.weight.detach(), fmt, group_size, scale_dtype=scale_dtype, search=search)
        return cls(qw, linear.bias)

    @classmethod
    def from_packed(cls, fmt: str, group_size: int, in_features: int, out_features: int,
                    tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> "QuantLinear":
        """Rebuild from saved tensors (``qweight``, ``scales``, [``mins``], [``bias``])."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        t = dict(tensors)
        if bias is None:
            bias = t.pop("bias", None)
        else:
            t.pop("bias", None)
        need = {"qweight", "scales"} | ({"mins"} if FORMATS[fmt].affine else set())
        missing = need - set(t)
        if missing:
            raise ValueError(f"{fmt}: missing packed tensors {sorted(missing)}")
        qw = QuantizedWeight(fmt, (int(out_features), int(in_features)), int(group_size),
                             {k: t[k] for k in ("qweight", "scales", "mins") if k in t})
        return cls(qw, bias)

    def _apply(self, fn, recurse=True):
        """Device moves apply; dtype casts (``model.half()``, ``model.to(torch.bfloat16)``) do not
        touch the packed tensors, whose dtypes are part of the format."""
        names = self._tensor_names + (("bias",) if self.bias is not None else ())
        for name in names:
            t = self._buffers[name]
            nt = fn(t)
            if nt.dtype != t.dtype:
                nt = t.to(device=nt.device)
            self._buffers[name] = nt
        return self

    # -- views ---------------------------------------------------------------------------------
    @property
    def qweight_packed(self) -> QuantizedWeight:
        return QuantizedWeight(self.fmt, (self.out_features, self.in_features), self.group_size,
                               {k: getattr(self, k) for k in self._tensor_names})

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: codes (incl. block padding) + scales + mins (bias excluded)."""
        return self.qweight_packed.bits_per_weight

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized fp32 weight (reference decode; for inspection / fallbacks)."""
        return dequantize(self.qweight_packed)

    def packed_state(self) -> dict[str, torch.Tensor]:
        """Plain tensors to save (same keys as ``state_dict()``)."""
        d = {k: getattr(self, k) for k in self._tensor_names}
        if self.bias is not None:
            d["bias"] = self.bias
        return d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.qlinear import linear

        return linear(x, self.qweight_packed, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, "
                f"bpw={self.bits_per_weight:.3f}")


def quantize_model(model: nn.Module, fmt: str, group_size: int = 64, skip=DEFAULT_SKIP,
                   scale_dtype: torch.dtype = torch.float16, search: bool | None = None) -> nn.Module:
    """Replace (in place) every ``nn.Linear`` whose qualified name contains none of the ``skip``
    substrings by a :class:`QuantLinear`; returns ``model``.

    A layer whose ``in_features`` is not a multiple of the format's group size is left in float
    (logged), so odd shapes never break a model.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {sorted(FORMATS)}")
    skip = tuple(skip or ())
    targets = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not any(s in name for s in skip):
            targets.append(name)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        gs = effective_group_size(fmt, lin.in_features, group_size)
        if lin.in_features % gs:
            log.warning("quantize_model: keeping %s in float (in_features=%d not a multiple of %d)",
                        name, lin.in_features, gs)
            continue
        setattr(parent, child, QuantLinear.from_linear(lin, fmt, group_size, scale_dtype=scale_dtype, search=search))
    return model
