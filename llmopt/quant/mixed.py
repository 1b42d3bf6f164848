"""Mixed precision per layer: estimate how much each linear hurts in each candidate format,
choose one format *and group size* per linear under an average-bits budget
(:func:`allocate_bits`), and apply the plan (:func:`quantize_mixed`).

Candidates. A candidate is a format name (``"int4"``: the caller's ``group_size``) or a spec
``"int4:g32"`` (format + its own group size, see :func:`parse_spec`). :func:`candidate_specs` gives
the default menu of a module: int4 / int3 / int2 / int8 at every group size of
``DEFAULT_GROUP_SIZES`` that divides the module's ``in_features`` and has a native kernel
(``kernels.qlinear.supports_native``), so the allocator can trade group size against width
(e.g. int4 g32 = 5.0 bits, g64 = 4.5, g128 = 4.25, per row ~4.05; int3 g64 = 3.5 + block padding).
Every ``QuantLinear`` carries its own ``fmt`` and ``group_size``; checkpoints store both per module.

Sensitivity (two estimators, same output ``{module: {candidate: estimated KL increase}}``):

* :func:`fisher_sensitivity` (default, fast): one forward + ``samples`` backward passes of the
  calibration set give every linear's inputs ``X`` and the gradients ``G`` of ``-log q(y)`` w.r.t.
  its output, with ``y`` sampled from the model itself, i.e. the Fisher of the next-token
  distribution. The KL increase of perturbing that output by ``dY = X dW^T`` is
  ``~ 0.5 * mean_t E_y[(g_t . dY_t)^2]`` (second order; the first order term vanishes at the float
  model). For ``qkv_proj`` the perturbation is first pushed exactly through the layer's attention
  (and ``o_proj``), for ``gate_up_proj`` through SwiGLU (and ``down_proj``), so the q.k and gate
  non-linearities are modeled instead of linearized. Cost: one forward + ``samples`` backwards of
  the calibration tokens, then per (module, candidate) one RTN and a few ``T x K x N`` products.
* :func:`layer_sensitivity` (the original, slow): the measured KL with that module ALONE quantized,
  one partial forward per (module, candidate).

:func:`plan_mixed` is the whole pipeline the CLI runs: Fisher estimate -> allocation ->
re-measurement: the real calibration KL of each module type's part of the plan (all its modules
quantized at once, the rest float) is compared with the sum of their estimates, each type's
estimates are rescaled by that ratio (this catches what the per-module second-order estimate
misses: interactions between modules, curvature) and the allocation is redone, ``refine`` times.

Bits are the formats' real stored bits per weight (codes incl. block padding + scales + mins) at
the group size, measured with the real packer on one row of the module's ``in_features``.

Measured (SmolLM2-135M, a Q4_1 GGUF: its weights already sit on a group-32 int4 grid, so int4 g32
is lossless; ``benchmarks/mixed_precision.py``, one core, 40 held-out texts / 8382 tokens, lm_head
float; fp32 ppl 17.339): uniform int4 g64 RTN (4.5 bits) 23.635 (+36.3%); ``--bits 4`` RTN
(4.000 bits: qkv mostly int4 g32, down_proj int3 g128, o/gate_up int3 g64 or int4 per row)
24.253 (+39.9%, a miss: every sub-4.5-bit option of this model is expensive and int3 pays 11%
block padding at in_features 576); the same plan with GPTQ (``--method gptq``) 19.783 (+14.1%),
better than uniform int4 g64 GPTQ at 4.5 bits (20.427). Plan search: ~3.5-5 min (16 x 128
tokens); the previous per-module KL search took ~27 min for a 4-format menu.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from llmopt.formats.layouts import FORMATS, effective_group_size

log = logging.getLogger(__name__)

__all__ = ["layer_sensitivity", "fisher_sensitivity", "allocate_bits", "quantize_mixed", "plan_mixed",
           "format_bits", "spec_bits", "parse_spec", "spec_name", "candidate_specs", "linear_sizes",
           "parse_menu", "menu_target", "bits_range", "plan_bits", "quantizable_linears", "WIDTH_FORMATS",
           "DEFAULT_CANDIDATES", "DEFAULT_GROUP_SIZES"]

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


def _set_module(model: nn.Module, name: str, mod: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, mod)


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


class _Runner:
    """Float forward of a Transformer that caches the input of every decoder layer, so a forward
    can restart at layer ``i`` (the residual stream is cloned: add_rms_norm works in place)."""

    def __init__(self, model: nn.Module, seqs: list[list[int]]):
        self.model = model
        self.seqs = [torch.tensor(s, dtype=torch.long) for s in seqs]
        self.cache: list[list[tuple[torch.Tensor, torch.Tensor | None]]] = []
        self.ref_logp: list[torch.Tensor] = []
        with torch.no_grad():
            for ids in self.seqs:
                pos = torch.arange(len(ids))
                x = model.embed_tokens(ids)
                cos_sin = self.model.rope_table(x.dtype)
                res = None
                states = []
                for layer in model.layers:
                    states.append((x.clone(), None if res is None else res.clone()))
                    x, res = layer(x, res, pos, cos_sin, None)
                self.cache.append(states)
                self.ref_logp.append(self._head(x, res))

    def _head(self, x, res) -> torch.Tensor:
        m = self.model
        return torch.log_softmax(m.compute_logits(m.final_norm(x, res)), dim=-1)

    @torch.no_grad()
    def mean_kl(self, start_layer: int | None) -> float:
        """Mean per-token KL(float || current model), re-running from ``start_layer`` (None: all)."""
        m = self.model
        total, n = 0.0, 0
        for s, ids in enumerate(self.seqs):
            pos = torch.arange(len(ids))
            if start_layer is None:
                start = 0
                x, res = m.embed_tokens(ids), None
            else:
                start = start_layer
                x, res = self.cache[s][start]
                x = x.clone()
                res = None if res is None else res.clone()
            cos_sin = self.model.rope_table(x.dtype)
            for layer in m.layers[start:]:
                x, res = layer(x, res, pos, cos_sin, None)
            logq = self._head(x, res)
            logp = self.ref_logp[s]
            kl = (logp.exp() * (logp - logq)).sum(-1)
            total += float(kl.sum())
            n += kl.numel()
        return total / max(n, 1)


def _check_calib(calib) -> None:
    if not calib or not all(len(s) >= 2 for s in calib):
        raise ValueError("mixed-precision sensitivity needs calibration sequences of at least 2 tokens")


def layer_sensitivity(model: nn.Module, calib: list[list[int]],
                      candidates: Iterable[str] | dict[str, Iterable[str]] | None = DEFAULT_CANDIDATES,
                      group_size: int | None = 64, progress: Progress | None = None,
                      skip: Iterable[str] = ("lm_head", "embed")) -> dict[str, dict[str, float]]:
    """``{module: {candidate: mean KL}}`` for every quantizable linear and candidate (format name at
    ``group_size``, or ``"fmt:gN"``; None = :func:`candidate_specs` of each module; or a dict
    ``{module: [candidates]}``), each module quantized ALONE with RTN (restored afterwards), versus
    the float model on ``calib``.

    A candidate that cannot hold a module (in_features not a multiple of its group size) is left
    out of that module's dict. The model must be float (no QuantLinear among the measured modules).

    Cost: ~``len(modules) * len(candidates) / 2`` full forwards of ``calib`` (the layers from the
    module's layer on, plus the head) plus one RTN per (module, format); int2/int3 RTN runs its
    clipping search (0.3-5 s for one of SmolLM2's larger linears). SmolLM2-135M: 120 modules x 4
    formats = 480 measurements took ~27 min on one core with 4 x 128 tokens; prefer
    :func:`fisher_sensitivity` (~4 min for a richer menu on 16 x 128 tokens).
    """
    from .linear import QuantLinear

    _check_calib(calib)
    mods = quantizable_linears(model, skip)
    if not mods:
        raise ValueError("the model has no float linear to measure (already quantized?)")
    cands = _per_module(mods, candidates, group_size)
    was_training = model.training
    model.eval()
    runner = _Runner(model, calib)
    jobs = [(n, f) for n in mods for f in cands[n]]
    out: dict[str, dict[str, float]] = {n: {} for n in mods}
    for i, (name, spec) in enumerate(jobs):
        lin = mods[name]
        fmt, gs = parse_spec(spec, group_size)
        _set_module(model, name, QuantLinear.from_linear(lin, fmt, gs))
        try:
            out[name][spec] = runner.mean_kl(_layer_index(name))
        finally:
            _set_module(model, name, lin)
        if progress is not None:
            progress(i + 1, len(jobs), f"{name} {spec}")
    model.train(was_training)
    return {n: d for n, d in out.items() if d}


def fisher_sensitivity(model: nn.Module, calib: list[list[int]],
                       candidates: Iterable[str] | dict[str, Iterable[str]] | None = None,
                       group_size: int | None = 64, samples: int = 2, seed: int = 0,
                       progress: Progress | None = None, skip: Iterable[str] = ("lm_head", "embed"),
                       propagate: bool = True) -> dict[str, dict[str, float]]:
    """``{module: {candidate: estimated mean KL increase per token}}`` from the Fisher of the
    model's next-token distribution (see the module docstring), same shape as
    :func:`layer_sensitivity`.

    ``candidates``: None = :func:`candidate_specs` of each module (format + group size menu); a list
    of formats (at ``group_size``) or ``"fmt:gN"`` specs, kept where they fit; or a dict
    ``{module: [candidates]}``. ``samples``: labels drawn per token (one backward pass each; the
    estimate averages them). ``propagate``: push qkv / gate_up errors through attention / SwiGLU.

    Memory: the inputs and output gradients of every linear over the calibration tokens, in
    bfloat16 (SmolLM2-135M, 2048 tokens, 2 samples: ~1.7 GB). Parameters are left untouched
    (``requires_grad`` is restored); already quantized linears are used as they are.
    """
    import torch.nn.functional as F

    from llmopt.kernels import ops

    from .linear import QuantLinear

    if samples < 1:
        raise ValueError("samples must be >= 1")
    _check_calib(calib)
    mods = quantizable_linears(model, skip)
    if not mods:
        raise ValueError("the model has no float linear to measure (already quantized?)")
    cands = _per_module(mods, candidates, group_size)
    layers = getattr(model, "layers", None)
    watch: dict[str, nn.Module] = dict(mods)
    if propagate and layers is not None:  # output gradients of o_proj / down_proj for qkv / gate_up
        for i in range(len(layers)):
            for rel in ("self_attn.o_proj", "mlp.down_proj"):
                n = f"layers.{i}.{rel}"
                try:
                    m = model.get_submodule(n)
                except AttributeError:
                    continue
                if isinstance(m, (nn.Linear, QuantLinear)):
                    watch.setdefault(n, m)
    S = int(samples)
    X: dict[str, list[torch.Tensor]] = {n: [] for n in mods}
    G: dict[str, list[list[torch.Tensor]]] = {n: [[] for _ in range(S)] for n in watch}
    state = {"s": 0}
    hooks = []
    for n, m in watch.items():
        def fwd_hook(mod, inp, out, n=n):
            if n in X:
                X[n].append(inp[0].detach().to(torch.bfloat16))
            if out.requires_grad:
                out.register_hook(lambda g, n=n: G[n][state["s"]].append(g.detach().to(torch.bfloat16)))
        hooks.append(m.register_forward_hook(fwd_hook))
    hooks.append(model.embed_tokens.register_forward_hook(lambda mod, i, o: o.detach().requires_grad_(True)))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    n_jobs = sum(len(c) for c in cands.values())
    total_steps = len(calib) + n_jobs
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for j, seq in enumerate(calib):
            ids = torch.tensor(list(seq), dtype=torch.long)
            with torch.enable_grad():
                h = model(ids, torch.arange(len(ids)))
                logp = torch.log_softmax(model.compute_logits(h).float(), dim=-1)
                probs = logp.detach().exp()
                for s in range(S):
                    y = torch.multinomial(probs, 1, generator=gen)
                    state["s"] = s
                    (-logp.gather(1, y).sum()).backward(retain_graph=s < S - 1)
            if progress is not None:
                progress(j + 1, total_steps, f"fisher: gradients of sequence {j + 1}/{len(calib)}")
    finally:
        for hk in hooks:
            hk.remove()
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)
    for n in watch:
        if any(len(g) != len(calib) for g in G[n]):
            raise RuntimeError(f"fisher_sensitivity: no gradient reached {n} (is it used by the forward?)")
    n_tok = sum(len(s) for s in calib)
    out: dict[str, dict[str, float]] = {}

    def grad_source(n: str) -> tuple[str, str]:
        li, kind = _layer_index(n), n.rsplit(".", 1)[-1]
        if propagate and li is not None and layers is not None:
            if kind == "qkv_proj" and f"layers.{li}.self_attn.o_proj" in G:
                return "attn", f"layers.{li}.self_attn.o_proj"
            if kind == "gate_up_proj" and f"layers.{li}.mlp.down_proj" in G:
                return "swiglu", f"layers.{li}.mlp.down_proj"
        return "plain", n

    uses: dict[str, int] = {w: 0 for w in G}
    for n in mods:
        for w in {n, grad_source(n)[1]}:
            uses[w] += 1
    done = len(calib)
    with torch.no_grad():
        for n, lin in mods.items():
            W = lin.weight.detach().float()
            b = None if lin.bias is None else lin.bias.detach().float()
            li = _layer_index(n)
            mode, gname = grad_source(n)
            xs = [x.float() for x in X.pop(n)]
            gs = [[g.float() for g in G[gname][s]] for s in range(S)]
            base = []  # per sequence: the float output and what the non-linearity makes of it
            if mode == "attn":
                attn = layers[li].self_attn
                Wn = attn.o_proj.weight.detach().float()
                cos_sin = model.rope_table(torch.float32)
                for x in xs:
                    y0 = F.linear(x, W, b)
                    pos = torch.arange(x.shape[0])
                    base.append((y0, attn.attend(y0.clone(), pos, cos_sin, None), pos))
            elif mode == "swiglu":
                Wn = layers[li].mlp.down_proj.weight.detach().float()
                for x in xs:
                    y0 = F.linear(x, W)
                    base.append((y0, ops.silu_mul(y0), None))
            out[n] = {}
            for spec in cands[n]:
                dW = _dequantized(W, spec, group_size) - W
                acc = 0.0
                for j, x in enumerate(xs):
                    dY = x @ dW.t()
                    if mode == "attn":
                        y0, a0, pos = base[j]
                        dz = (attn.attend(y0 + dY, pos, cos_sin, None) - a0) @ Wn.t()
                    elif mode == "swiglu":
                        y0, a0, _ = base[j]
                        dz = (ops.silu_mul(y0 + dY) - a0) @ Wn.t()
                    else:
                        dz = dY
                    for s in range(S):
                        acc += float((dz * gs[s][j]).sum(1).pow(2).sum())
                out[n][spec] = 0.5 * acc / (S * n_tok)
                done += 1
                if progress is not None:
                    progress(done, total_steps, f"{n} {spec}")
            for w in {n, gname}:  # free the gradients no later module needs
                uses[w] -= 1
                if uses[w] <= 0:
                    G.pop(w, None)
    return {n: d for n, d in out.items() if d}


# ---- allocation --------------------------------------------------------------------------------
def parse_menu(menu: Iterable[Any] | str | None) -> tuple[str, ...] | None:
    """``"2,4,8"`` / ``[2, 4, 8]`` / ``["int4", "fp8"]`` / ``"int4:g32,int3:g64"`` -> candidate names
    (widths map through ``WIDTH_FORMATS``: 2 -> int2, 3 -> int3, 4 -> int4, 8 -> int8)."""
    if menu is None:
        return None
    items = [s.strip() for s in menu.split(",")] if isinstance(menu, str) else list(menu)
    out: list[str] = []
    for it in items:
        if isinstance(it, str) and it in FORMATS:
            f = it
        elif isinstance(it, str) and ":" in it:
            fmt, gs = parse_spec(it)
            f = spec_name(fmt, gs)
        else:
            try:
                w = float(it)
            except (TypeError, ValueError):
                raise ValueError(f"bits menu entry {it!r} is neither a width ({', '.join(map(str, WIDTH_FORMATS))}) "
                                 f"nor a format ({', '.join(sorted(FORMATS))}, optionally with a group size "
                                 "like int4:g32)") from None
            if w not in WIDTH_FORMATS:
                raise ValueError(f"bits menu entry {it!r}: mixed precision has widths "
                                 f"{', '.join(map(str, WIDTH_FORMATS))} (int2, int3, int4, int8)")
            f = WIDTH_FORMATS[int(w)]
        if f not in out:
            out.append(f)
    if not out:
        raise ValueError("the bits menu is empty")
    return tuple(out)


def _size(v: Any) -> tuple[int, int | None]:
    """sizes value -> (n_params, in_features or None)."""
    if isinstance(v, (tuple, list)):
        n, k = int(v[0]), int(v[1])
        return n * k, k
    return int(v), None


def _expand(fmts: Iterable[str], k: int, group_size: int | None) -> list[str]:
    """Candidates of one module: bare formats at ``group_size``, or with ``group_size=None`` every
    native group size of :data:`DEFAULT_GROUP_SIZES` (specs are kept as they are)."""
    out: list[str] = []
    for f in fmts:
        if group_size is None and ":" not in f:
            out += [c for c in candidate_specs(k, (f,)) if c not in out]
        elif _fits(f, k, group_size) and f not in out:
            out.append(f)
    return out


def menu_target(sizes: dict[str, Any], menu: Iterable[Any] | str, group_size: int | None = 64) -> float:
    """The default target of a menu without ``--bits X``: the mean over the menu's formats of
    each format's model-average real bits per weight (modules it cannot hold are left out; with
    ``group_size=None`` a bare format counts at group size 64)."""
    fmts = parse_menu(menu)
    gs = 64 if group_size is None else group_size
    per_fmt = []
    for f in fmts:
        bits = cnt = 0.0
        for v in sizes.values():
            n, k = _size(v)
            k = k if k is not None else 1024
            if _fits(f, k, gs):
                bits += spec_bits(f, k, gs) * n
                cnt += n
        if cnt:
            per_fmt.append(bits / cnt)
    if not per_fmt:
        raise ValueError(f"no format of the menu {', '.join(fmts)} fits these modules at group size {gs}")
    return sum(per_fmt) / len(per_fmt)


def bits_range(sizes: dict[str, Any], menu: Iterable[Any] | str | None = None,
               group_size: int | None = 64) -> tuple[float, float]:
    """(lowest, highest) average real bits per weight reachable with the menu (default: the
    int2/int3/int4/int8 candidates; ``group_size=None``: at every native group size, see
    :func:`candidate_specs`); a module no candidate fits is left out."""
    fmts = parse_menu(menu) or DEFAULT_CANDIDATES
    lo = hi = tot = 0.0
    for v in sizes.values():
        n, k = _size(v)
        k = k if k is not None else 1024
        b = [spec_bits(f, k, group_size) for f in _expand(fmts, k, group_size)]
        if b:
            lo += min(b) * n
            hi += max(b) * n
            tot += n
    if not tot:
        raise ValueError(f"no format of {', '.join(fmts)} fits these modules at group size {group_size}")
    return lo / tot, hi / tot


def allocate_bits(sensitivity: dict[str, dict[str, float]], sizes: dict[str, Any],
                  target_bits: float | None = None, menu: Iterable[Any] | str | None = None,
                  group_size: int | None = 64) -> tuple[dict[str, str], float]:
    """One candidate per module minimizing the summed sensitivity subject to
    ``sum(bits(c_m) * params_m) / sum(params_m) <= target_bits``.

    The candidates are the keys of ``sensitivity[m]``: format names (at ``group_size``) or
    ``"fmt:gN"`` specs (their own group size), mixed freely. ``sizes[m]`` is ``(out_features,
    in_features)`` (exact bits per weight from the packer) or a parameter count (bits taken for
    in_features = 1024). ``menu`` restricts the candidates (widths 2/3/4/8, format names: any group
    size of that format, or specs). With a menu and no target the target is the mean of the menu
    formats' model-average bits per weight (e.g. 2,4,8 at group 64 ~= (2.5 + 4.5 + 8.25) / 3 = 5.08),
    i.e. the budget of using each width equally, spent where it helps most.

    Algorithm (deterministic): per module, the lower convex hull of (bits, sensitivity); start
    every module at its cheapest candidate; repeatedly take the hull step with the largest
    sensitivity drop per extra bit that still fits (ties: by name), then spend any leftover budget
    on the best single-module improvements that fit. Returns ``(plan, achieved_avg_bits)``.
    """
    fmts = parse_menu(menu)
    if target_bits is None and fmts is None:
        raise ValueError("allocate_bits needs target_bits or a menu of widths")
    names = sorted(n for n in sensitivity if n in sizes)
    missing = sorted(set(sensitivity) - set(sizes))
    if missing:
        raise ValueError(f"sizes lacks {len(missing)} modules of the sensitivity table, e.g. {missing[0]!r}")
    if not names:
        raise ValueError("no module to allocate")
    pts: dict[str, list[tuple[float, float, str]]] = {}  # name -> [(total bits, sens, candidate)] by bits
    params: dict[str, int] = {}
    for n in names:
        cnt, k = _size(sizes[n])
        params[n] = cnt
        kk = k if k is not None else 1024
        opts = []
        for f, s in sensitivity[n].items():
            fmt = parse_spec(f, group_size)[0]  # unknown format -> ValueError
            if fmts is not None and f not in fmts and fmt not in fmts:
                continue
            if not _fits(f, kk, group_size):
                continue
            s = float(s)
            if not math.isfinite(s):
                continue
            opts.append((spec_bits(f, kk, group_size) * cnt, s, f))
        if not opts:
            raise ValueError(f"module {n!r} has no allowed format (menu {fmts}, measured {sorted(sensitivity[n])})")
        opts.sort(key=lambda t: (t[0], t[1], t[2]))
        pts[n] = opts
    total_params = sum(params.values())
    if target_bits is None:
        target_bits = menu_target({n: sizes[n] for n in names}, fmts, group_size)
    target_bits = float(target_bits)
    budget = target_bits * total_params
    lo = sum(p[0][0] for p in pts.values())
    if lo > budget * (1 + 1e-12):
        raise ValueError(f"target {target_bits:g} bits per weight is below the smallest possible "
                         f"{lo / total_params:.3f} with formats "
                         f"{', '.join(sorted({o[2] for p in pts.values() for o in p}))} at group size {group_size}: "
                         "raise --bits or allow lower widths")

    def hull(opts):
        # drop dominated points (more bits, not less sensitivity), then keep the lower convex hull
        pareto = []
        for b, s, f in opts:
            if pareto and s >= pareto[-1][1]:
                continue
            if pareto and b == pareto[-1][0]:
                pareto[-1] = (b, s, f)
                continue
            pareto.append((b, s, f))
        h: list[tuple[float, float, str]] = []
        for p in pareto:
            while len(h) >= 2:
                (b1, s1, _), (b2, s2, _) = h[-2], h[-1]
                # h[-1] is above the segment h[-2] -> p: remove it
                if (s2 - s1) * (p[0] - b1) >= (p[1] - s1) * (b2 - b1):
                    h.pop()
                else:
                    break
            h.append(p)
        return h

    hulls = {n: hull(pts[n]) for n in names}
    choice = {n: pts[n][0] for n in names}  # cheapest (ties: least sensitive)
    idx = {n: -1 for n in names}  # position on the hull (-1: cheapest point, maybe not on the hull)
    used = sum(c[0] for c in choice.values())

    def next_step(n):
        h, cur = hulls[n], choice[n]
        for j in range(idx[n] + 1, len(h)):
            if h[j][0] > cur[0] and h[j][1] < cur[1]:
                return j
        return None

    heap = []
    for n in names:
        j = next_step(n)
        if j is not None:
            b, s, _ = hulls[n][j]
            heapq.heappush(heap, (-(choice[n][1] - s) / (b - choice[n][0]), n, j))
    while heap:
        _, n, j = heapq.heappop(heap)
        b, s, f = hulls[n][j]
        extra = b - choice[n][0]
        if used + extra > budget * (1 + 1e-12):
            continue  # this module's later hull steps cost even more: drop it from the greedy
        used += extra
        choice[n], idx[n] = hulls[n][j], j
        j2 = next_step(n)
        if j2 is not None:
            b2, s2, _ = hulls[n][j2]
            heapq.heappush(heap, (-(s - s2) / (b2 - b), n, j2))
    # leftover budget: best single-module improvement that fits, until none fits
    while True:
        best = None
        for n in names:
            cur = choice[n]
            for o in pts[n]:
                extra = o[0] - cur[0]
                gain = cur[1] - o[1]
                if gain > 0 and used + extra <= budget * (1 + 1e-12):
                    key = (gain, -extra, n)
                    if best is None or key > best[0]:
                        best = (key, n, o)
        if best is None:
            break
        _, n, o = best
        used += o[0] - choice[n][0]
        choice[n] = o
    plan = {n: choice[n][2] for n in names}
    return plan, used / total_params


def plan_bits(plan: dict[str, str], sizes: dict[str, Any], group_size: int | None = 64) -> float:
    """Average real bits per weight of a plan (weighted by parameter count)."""
    tot = bits = 0.0
    for n, f in plan.items():
        cnt, k = _size(sizes[n])
        bits += spec_bits(f, k if k is not None else 1024, group_size) * cnt
        tot += cnt
    return bits / tot if tot else 0.0


# ---- the pipeline ------------------------------------------------------------------------------
def _module_kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def plan_mixed(model: nn.Module, calib: list[list[int]], target_bits: float | None = None,
               menu: Iterable[Any] | str | None = None, group_size: int | None = None,
               estimator: str = "fisher", samples: int = 2, refine: int = 1, seed: int = 0,
               progress: Progress | None = None, skip: Iterable[str] = ("lm_head", "embed")) -> dict[str, Any]:
    """Choose a mixed-precision plan for ``model`` (float, unchanged on return) on ``calib``.

    Candidates: the ``menu`` formats (default int2/int3/int4/int8) at ``group_size``, or with
    ``group_size=None`` at every native group size (:func:`candidate_specs`); specs in the menu are
    used as given. ``estimator``: "fisher" (:func:`fisher_sensitivity`) or "kl"
    (:func:`layer_sensitivity`). Then :func:`allocate_bits` at ``target_bits`` (default: the menu's
    mean, see :func:`menu_target`), and ``refine`` rounds of re-measurement: per module type (the
    last part of the name: qkv_proj, o_proj, ...) the real calibration KL of that type's part of
    the plan (those modules quantized together, the rest float) over the sum of its estimates
    rescales the type's estimates (geometric mean over the rounds), the allocation is redone, the
    real KL of the whole plan is measured; the plan with the lowest measured KL is kept.

    Returns ``{"plan", "bits", "target_bits", "sensitivity" (raw estimates), "factors" (per type),
    "calib_kl" (measured KL of the kept plan), "rounds": [{"plan_kl", "bits", "factors"}],
    "seconds": {...}}``.
    """
    if estimator not in ("fisher", "kl"):
        raise ValueError(f"unknown sensitivity estimator {estimator!r}: use fisher or kl")
    if refine < 0:
        raise ValueError("refine must be >= 0")
    t0 = time.perf_counter()
    fmts = parse_menu(menu)
    mods = quantizable_linears(model, skip)
    if not mods:
        raise ValueError("the model has no float linear to quantize")
    sizes = {n: (m.out_features, m.in_features) for n, m in mods.items()}
    cands = {n: _expand(fmts or DEFAULT_CANDIDATES, m.in_features, group_size) for n, m in mods.items()}
    bad = [n for n, c in cands.items() if not c]
    if bad:
        raise ValueError(f"no candidate format fits {bad[0]} (in_features={mods[bad[0]].in_features}) "
                         f"at group size {group_size}")
    if target_bits is None:
        if fmts is None:
            raise ValueError("plan_mixed needs target_bits or a menu")
        target_bits = menu_target(sizes, fmts, group_size)
    if estimator == "fisher":
        sens = fisher_sensitivity(model, calib, cands, group_size, samples=samples, seed=seed,
                                  progress=progress, skip=skip)
    else:
        sens = layer_sensitivity(model, calib, cands, group_size, progress=progress, skip=skip)
    t_sens = time.perf_counter() - t0
    plan, bits = allocate_bits(sens, sizes, target_bits=target_bits, group_size=group_size)
    result: dict[str, Any] = {"plan": plan, "bits": bits, "target_bits": float(target_bits), "sensitivity": sens,
                              "factors": {}, "calib_kl": None, "rounds": [],
                              "seconds": {"sensitivity": round(t_sens, 3)}}
    if refine == 0:
        result["seconds"]["total"] = round(time.perf_counter() - t0, 3)
        return result

    t1 = time.perf_counter()
    was_training = model.training
    model.eval()
    runner = _Runner(model, calib)
    deq: dict[tuple[str, str], torch.Tensor] = {}

    def measure(sub: dict[str, str]) -> float:
        """Real calibration KL with the modules of ``sub`` quantized (RTN), the rest float."""
        saved = {}
        try:
            for n, spec in sub.items():
                lin = mods[n]
                if (n, spec) not in deq:
                    deq[(n, spec)] = _dequantized(lin.weight, spec, group_size)
                saved[n] = lin.weight.data
                lin.weight.data = deq[(n, spec)]
            starts = [_layer_index(n) for n in sub]
            start = None if any(s is None for s in starts) or not starts else min(starts)
            return runner.mean_kl(start)
        finally:
            for n, w in saved.items():
                mods[n].weight.data = w

    kinds = sorted({_module_kind(n) for n in mods})
    ratios: dict[str, list[float]] = {k: [] for k in kinds}
    best = (measure(plan), plan, bits)
    result["rounds"].append({"plan_kl": best[0], "bits": bits, "factors": {}})
    steps = refine * (len(kinds) + 1)
    step = 0
    for r in range(refine):
        for kind in kinds:
            sub = {n: s for n, s in plan.items() if _module_kind(n) == kind}
            est = sum(sens[n][s] for n, s in sub.items())
            if sub and est > 0:
                real = measure(sub)
                if real > 0:
                    ratios[kind].append(min(max(real / est, 1 / 16), 16.0))
            step += 1
            if progress is not None:
                progress(step, steps, f"re-measure round {r + 1}: {kind}")
        factors = {k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in ratios.items() if v}
        scaled = {n: {s: v * factors.get(_module_kind(n), 1.0) for s, v in d.items()} for n, d in sens.items()}
        plan, bits = allocate_bits(scaled, sizes, target_bits=target_bits, group_size=group_size)
        kl = measure(plan)
        step += 1
        if progress is not None:
            progress(step, steps, f"re-measure round {r + 1}: whole plan")
        result["rounds"].append({"plan_kl": kl, "bits": bits, "factors": dict(factors)})
        result["factors"] = dict(factors)
        if kl < best[0]:
            best = (kl, plan, bits)
    model.train(was_training)
    result.update({"calib_kl": best[0], "plan": best[1], "bits": best[2]})
    result["seconds"]["refine"] = round(time.perf_counter() - t1, 3)
    result["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    return result


# ---- applying a plan ---------------------------------------------------------------------------
def _gptq_mixed(model: nn.Module, plan: dict[str, tuple[str, int | None]], calib, progress: Progress | None):
    """GPTQ of every planned module at its own format + group size, in one sequential pass (the
    scheme of ``gptq.gptq_quantize_model``: each Hessian from inputs computed with every earlier
    module already quantized)."""
    from llmopt.formats.layouts import dequantize

    from .gptq import check_model_and_calib, embed_inputs, gptq_quantize_weight, gram, layer_stages, output_error
    from .linear import QuantLinear

    check_model_and_calib(model, calib)
    t0 = time.perf_counter()
    stats: dict[str, Any] = {"method": "gptq", "tokens": sum(len(s) for s in calib), "layers": {}}
    with torch.no_grad():
        emb = embed_inputs(model, calib)
        xs = [e for e, _ in emb]
        positions = [p for _, p in emb]
        cos_sin = model.rope_table(xs[0].dtype)
        residuals: list = [None] * len(xs)
        last = max(_layer_index(n) for n in plan)
        for li, layer in enumerate(model.layers[:last + 1]):
            def on_inputs(rel: str, inputs: list, li=li) -> None:
                name = f"layers.{li}.{rel}"
                if name not in plan:
                    return
                fmt, gs = plan[name]
                mod = model.get_submodule(name)
                S, n = gram(inputs)
                W = mod.weight.detach().float()
                qw, st = gptq_quantize_weight(W, S * (2.0 / n), fmt, gs)
                st["rel_err"] = output_error(W, dequantize(qw), S)
                stats["layers"][name] = st
                bias = mod.bias.detach() if mod.bias is not None else None
                _set_module(model, name, QuantLinear(qw, bias).to(W.device))

            xs, residuals = layer_stages(layer, xs, residuals, positions, cos_sin, on_inputs)
            if progress is not None:
                progress(li + 1, last + 1, f"gptq mixed layer {li}")
    stats["seconds"] = time.perf_counter() - t0
    return stats


def quantize_mixed(model: nn.Module, plan: dict[str, str], group_size: int | None = 64, method: str = "rtn",
                   calib: list[list[int]] | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Quantize (in place) every module of ``plan`` to its candidate (format at ``group_size`` or
    ``"fmt:gN"``) with ``method`` (rtn | gptq | awq; gptq/awq need ``calib``). Modules not in the
    plan stay as they are. GPTQ runs once over the layers with each module's own format and group
    size; AWQ runs once per distinct (format, group size). Returns ``{"method", "plan", "modules":
    n, "stats"}`` (gptq: its per-module stats; awq: ``{candidate: what awq returned}``)."""
    from .linear import QuantLinear

    if method not in ("rtn", "gptq", "awq"):
        raise ValueError(f"unknown method {method!r}: use rtn, gptq or awq")
    mods = dict(model.named_modules())
    parsed: dict[str, tuple[str, int | None]] = {}
    for n, f in plan.items():
        fmt, gs = parse_spec(f, group_size)  # unknown format -> ValueError naming it
        m = mods.get(n)
        if not isinstance(m, nn.Linear):
            raise ValueError(f"plan: {n!r} is not a float linear of this model")
        if not _fits(f, m.in_features, group_size):
            raise ValueError(f"plan: {n} has in_features={m.in_features}, not a multiple of {f}'s group size")
        parsed[n] = (fmt, gs)
    stats: dict[str, Any] = {}
    if method == "rtn":
        for i, (n, (fmt, gs)) in enumerate(parsed.items()):
            _set_module(model, n, QuantLinear.from_linear(mods[n], fmt, gs))
            if progress is not None:
                progress(i + 1, len(plan), n)
    else:
        if not calib:
            raise ValueError(f"method {method} needs calibration sequences (calib=...)")
        if method == "gptq":
            from .gptq import GPTQ_FORMATS

            bad = sorted({f for f, _ in parsed.values() if f not in GPTQ_FORMATS})
            if bad:
                raise ValueError(f"GPTQ supports {', '.join(GPTQ_FORMATS)}; the plan has {', '.join(bad)}")
            if any(_layer_index(n) is None for n in parsed):
                raise ValueError("gptq: every planned module must be inside a decoder layer (layers.<i>.)")
            if parsed:
                stats = _gptq_mixed(model, parsed, calib, progress)
        else:
            from .awq import awq_quantize_model as run

            all_linear = [n for n, m in mods.items() if isinstance(m, nn.Linear)]
            by_spec: dict[tuple[str, int | None], list[str]] = {}
            for n, fg in parsed.items():
                by_spec.setdefault(fg, []).append(n)
            for (fmt, gs) in sorted(by_spec, key=lambda t: (t[0], t[1] or 0)):
                keep = set(by_spec[(fmt, gs)])
                # skip patterns are substrings of qualified names; a full name matches only itself
                skip = tuple(n for n in all_linear if n not in keep) + ("lm_head", "embed")
                skip = tuple(s for s in skip if not any(s in k for k in keep))
                key = fmt if gs == group_size else spec_name(fmt, gs)
                stats[key] = run(model, fmt, gs, calib, skip=skip, progress=progress)
        left = [n for n in plan if not isinstance(model.get_submodule(n), QuantLinear)]
        if left:
            raise RuntimeError(f"{method} left {len(left)} planned modules unquantized, e.g. {left[0]}")
    return {"method": method, "plan": dict(plan), "modules": len(plan), "stats": stats}
