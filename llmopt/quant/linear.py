"""``QuantLinear``: a drop-in ``nn.Linear`` replacement holding a packed quantized weight, and
``quantize_model`` which swaps the ``nn.Linear`` modules of a model.

The state dict holds only plain tensors (``qweight``, ``scales``, optional ``mins``, optional
``bias``) so it can be written with ``safetensors``; the format name and group size are module
attributes (``fmt``, ``group_size``) that a checkpoint writer must store alongside (e.g. in the
safetensors metadata) and pass back to :meth:`QuantLinear.from_packed`.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from .formats import FORMATS, QuantizedWeight, dequantize, effective_group_size, quantize

log = logging.getLogger(__name__)

__all__ = ["QuantLinear", "quantize_model", "DEFAULT_SKIP", "QUANTIZE_LM_HEAD", "LM_HEAD_FMT"]

DEFAULT_SKIP = ("lm_head", "embed")

# Default of ``quantize_model(quantize_lm_head=None)`` when ``skip`` is left at DEFAULT_SKIP (the
# engine's ``LLM(quant=...)`` path). Env ``LLMOPT_QUANT_LM_HEAD``: "0" / "1" or a format name for
# the head (e.g. "int8"), for measurements. See quantize_model for the measured trade-off.
_env_head = os.environ.get("LLMOPT_QUANT_LM_HEAD", "int8").strip()
QUANTIZE_LM_HEAD: bool = _env_head not in ("0", "", "false", "no")
LM_HEAD_FMT: str | None = _env_head if _env_head in FORMATS else None  # None: the model's format


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
        self._fwd = None  # cached dispatch (kernels.qlinear.make_forward), rebuilt after moves

    def __setattr__(self, name, value):
        if name in self.__dict__.get("_tensor_names", ()) or name == "bias":
            self.__dict__["_fwd"] = None  # a packed tensor was replaced: drop the cached dispatch
        super().__setattr__(name, value)

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
        self._fwd = None
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
        fwd = self._fwd
        if fwd is None:
            from ..kernels.qlinear import make_forward

            fwd = self._fwd = make_forward(self.qweight_packed, self.bias)
        return fwd(x)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._fwd = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, "
                f"bpw={self.bits_per_weight:.3f}")


def quantize_model(model: nn.Module, fmt: str, group_size: int = 64, skip=DEFAULT_SKIP,
                   scale_dtype: torch.dtype = torch.float16, search: bool | None = None,
                   quantize_lm_head: bool | None = None, lm_head_fmt: str | None = None) -> nn.Module:
    """Replace (in place) every ``nn.Linear`` whose qualified name contains none of the ``skip``
    substrings by a :class:`QuantLinear`; returns ``model``.

    ``quantize_lm_head``: also quantize ``lm_head`` (in ``lm_head_fmt``, default ``fmt``), whatever
    ``skip`` says about it. A head tied to the input embedding gets its own packed copy and the
    embedding stays float (``embed_tokens`` is an ``nn.Embedding``, never touched here). None means
    :data:`QUANTIZE_LM_HEAD` / :data:`LM_HEAD_FMT` when ``skip`` is DEFAULT_SKIP (the engine's path)
    and "follow ``skip``" otherwise (callers passing their own skip list keep their behaviour).
    The head is the largest matrix of small models (SmolLM2-135M: 49152 x 576, 113 MB fp32, ~40% of
    an int4 decode step). Engine default: int8 (g = ``group_size``, exact fp32 activations), measured
    on SmolLM2-135M-Instruct int4 g64 (ppl on 10 pydoc topics / 4236 tokens): float head 17.225,
    int8 head 17.234 (+0.05%), w8a8 head 17.456 (+1.3%), int4 head 18.495 (+7.4%); float model
    12.821. Head time per decode step (1 thread, M=1): fp32 7.4 ms, int8 1.5 ms, int4 1.0 ms.

    A layer whose ``in_features`` is not a multiple of the format's group size is left in float
    (logged), so odd shapes never break a model.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {sorted(FORMATS)}")
    if lm_head_fmt is not None and lm_head_fmt not in FORMATS:
        raise ValueError(f"unknown lm_head format {lm_head_fmt!r}; known: {sorted(FORMATS)}")
    default_skip = skip is DEFAULT_SKIP
    skip = tuple(skip or ())
    if quantize_lm_head is None and default_skip:
        quantize_lm_head = QUANTIZE_LM_HEAD
        if lm_head_fmt is None:
            lm_head_fmt = LM_HEAD_FMT
    targets = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if name.rpartition(".")[2] == "lm_head" and quantize_lm_head is not None:
            if quantize_lm_head:
                targets.append((name, lm_head_fmt or fmt))
            continue
        if not any(s in name for s in skip):
            targets.append((name, fmt))
    for name, f in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        gs = effective_group_size(f, lin.in_features, group_size)
        if lin.in_features % gs:
            log.warning("quantize_model: keeping %s in float (in_features=%d not a multiple of %d)",
                        name, lin.in_features, gs)
            continue
        setattr(parent, child, QuantLinear.from_linear(lin, f, group_size, scale_dtype=scale_dtype, search=search))
    return model
