"""Candidate specs (``fmt`` or ``fmt:gN``), their real bits per weight, and the linears a plan covers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from llmopt.formats.layouts import FORMATS, effective_group_size

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = ("int2", "int3", "int4", "int8")
WIDTH_FORMATS = {2: "int2", 3: "int3", 4: "int4", 8: "int8"}  # --bits 2,4,8 menu entries
# group sizes tried per format by candidate_specs (0 = one group per row, i.e. in_features); only
# those dividing in_features with a native kernel are kept (int4: 32, 64 or multiples of 64;
# int3/int2: 32, 64 or multiples of 128; int8: multiples of 32)
DEFAULT_GROUP_SIZES: dict[str, tuple[int, ...]] = {
    "int4": (32, 64, 128, 256, 384, 768, 0),
    "int3": (32, 64, 128),
    "int2": (64, 128),
    "int8": (64,),
}

Progress = Callable[[int, int, str], None]  # (done, total, what)

_BITS_CACHE: dict[tuple[str, int, int], float] = {}
_NATIVE_CACHE: dict[tuple[str, int, int], bool] = {}


# ---- candidates: "fmt" or "fmt:gN" ------------------------------------------------------------
def parse_spec(spec: str, group_size: int | None = 64) -> tuple[str, int | None]:
    """``"int4:g32"`` (or ``"int4:32"``) -> ``("int4", 32)``; a bare format -> ``(fmt, group_size)``."""
    if not isinstance(spec, str):
        raise ValueError(f"format spec must be a string like 'int4' or 'int4:g32', got {spec!r}")
    fmt, sep, gs = spec.partition(":")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} in {spec!r}; known: {', '.join(sorted(FORMATS))}")
    if not sep:
        return fmt, group_size
    g = gs[1:] if gs[:1] in ("g", "G") else gs
    if not g.isdigit() or int(g) <= 0:
        raise ValueError(f"format spec {spec!r}: the group size after ':' must be like g32")
    return fmt, int(g)


def spec_name(fmt: str, group_size: int) -> str:
    """``("int4", 32)`` -> ``"int4:g32"``."""
    return f"{fmt}:g{int(group_size)}"


def format_bits(fmt: str, in_features: int, group_size: int) -> float:
    """Real stored bits per weight of ``fmt`` for a linear with ``in_features`` inputs at
    ``group_size`` (codes with block padding + scales + mins), from the real packer."""
    key = (fmt, int(in_features), int(group_size) if group_size is not None else -1)
    if key not in _BITS_CACHE:
        from llmopt.formats.layouts import quantize

        qw = quantize(torch.zeros(1, in_features), fmt, group_size, search=False)
        _BITS_CACHE[key] = qw.bits_per_weight
    return _BITS_CACHE[key]


def spec_bits(spec: str, in_features: int, group_size: int | None = 64) -> float:
    """:func:`format_bits` of a candidate (``"int4"`` at ``group_size`` or ``"int4:g32"``)."""
    fmt, gs = parse_spec(spec, group_size)
    return format_bits(fmt, in_features, gs)


def _fits(spec: str, in_features: int, group_size: int | None) -> bool:
    try:
        fmt, gs = parse_spec(spec, group_size)
        g = effective_group_size(fmt, in_features, gs)
    except ValueError:
        return False
    return in_features % g == 0


def _native(fmt: str, in_features: int, group_size: int) -> bool:
    """A native kernel for every path a QuantLinear of this format may take: ``supports_native``,
    and for int4 groups that ``kernels.qlinear`` sends to the int8-activation (w4a8) kernel at
    small batches (multiples of 64 up to 256) the group sizes that kernel accepts (64, 128, 256:
    int4 g192 passes ``supports_native`` but the w4a8 kernel rejects it, so it is left out)."""
    key = (fmt, int(in_features), int(group_size))
    if key not in _NATIVE_CACHE:
        from llmopt.formats.layouts import quantize
        from llmopt.kernels.qlinear import supports_native

        ok = bool(supports_native(quantize(torch.zeros(1, in_features), fmt, group_size, search=False)))
        if fmt == "int4" and group_size % 64 == 0 and group_size <= 256 and group_size not in (64, 128, 256):
            ok = False
        _NATIVE_CACHE[key] = ok
    return _NATIVE_CACHE[key]


def candidate_specs(in_features: int, formats: Iterable[str] = DEFAULT_CANDIDATES,
                    group_sizes: dict[str, Iterable[int]] | Iterable[int] | None = None,
                    native_only: bool = True) -> list[str]:
    """The candidates ``"fmt:gN"`` of a linear with ``in_features`` inputs: every format of
    ``formats`` at every group size of ``group_sizes`` (per format dict, or one list for all;
    default :data:`DEFAULT_GROUP_SIZES`; 0 = per row) that divides ``in_features`` and, with
    ``native_only``, has a native kernel. Formats without a group size (fp8, w8a8: per channel;
    fp4: 32) are returned bare. Sorted by bits per weight."""
    out: list[str] = []
    for fmt in formats:
        fmt = parse_spec(fmt)[0] if ":" in fmt else fmt
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; known: {', '.join(sorted(FORMATS))}")
        spec = FORMATS[fmt]
        if spec.per_channel or spec.fixed_group is not None:
            if _fits(fmt, in_features, None) and fmt not in out:
                out.append(fmt)
            continue
        if group_sizes is None:
            gss = DEFAULT_GROUP_SIZES.get(fmt, (32, 64, 128))
        elif isinstance(group_sizes, dict):
            gss = group_sizes.get(fmt, ())
        else:
            gss = group_sizes
        for g in gss:
            g = in_features if int(g) <= 0 else int(g)
            if g > in_features or in_features % g or g % 8:
                continue
            if native_only and not _native(fmt, in_features, g):
                continue
            s = spec_name(fmt, g)
            if s not in out:
                out.append(s)
    return sorted(out, key=lambda s: (spec_bits(s, in_features, 64), s))


def quantizable_linears(model: nn.Module, skip: Iterable[str] = ("lm_head", "embed")) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules ``quantize_model`` would touch (name -> module), in model order."""
    skip = tuple(skip or ())
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not any(s in n for s in skip)}


def linear_sizes(model: nn.Module, skip: Iterable[str] = ("lm_head", "embed")) -> dict[str, tuple[int, int]]:
    """``{name: (out_features, in_features)}`` of the quantizable linears (the ``sizes`` argument of
    :func:`allocate_bits`)."""
    return {n: (m.out_features, m.in_features) for n, m in quantizable_linears(model, skip).items()}


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit():
        return int(parts[1])
    return None


def _module_candidates(lin: nn.Linear, candidates: Iterable[str] | None, group_size: int | None) -> list[str]:
    """Candidates of one module: the rich menu (None) or the given formats/specs that fit."""
    if candidates is None:
        return candidate_specs(lin.in_features)
    return [c for c in candidates if _fits(c, lin.in_features, group_size)]


def _per_module(mods: dict[str, nn.Linear], candidates, group_size: int | None) -> dict[str, list[str]]:
    """``candidates`` (None, a list for every module, or ``{module: list}``) -> ``{module: list}``;
    every entry is checked (unknown format -> ValueError)."""
    out = {}
    for n, lin in mods.items():
        c = candidates.get(n) if isinstance(candidates, dict) else candidates
        c = None if c is None else tuple(c)
        for x in c or ():
            parse_spec(x, group_size)
        out[n] = _module_candidates(lin, c, group_size)
    return out


def _dequantized(w: torch.Tensor, spec: str, group_size: int | None) -> torch.Tensor:
    from llmopt.formats.layouts import dequantize, quantize

    fmt, gs = parse_spec(spec, group_size)
    return dequantize(quantize(w.detach().float(), fmt, gs)).to(w.dtype)
