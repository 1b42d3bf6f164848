"""Mixed precision per layer: measure how much each linear hurts when quantized alone
(:func:`layer_sensitivity`), choose one format per linear under an average-bits budget
(:func:`allocate_bits`), and apply the plan (:func:`quantize_mixed`).

Sensitivity of module ``m`` at format ``f`` = mean over calibration tokens of
``KL(p_float || p_{m quantized to f, everything else float})`` of the next-token distribution.
The float model's log-probs and the residual stream entering every decoder layer are computed
once; a module inside layer ``i`` is then measured by re-running layers ``i..L-1`` + the head
only (half the model on average). Cost on SmolLM2-135M (30 layers x 4 linears x 4 candidates =
480 partial forwards of 4 x 128 tokens): see ``layer_sensitivity``'s docstring.

Bits are the formats' real stored bits per weight (codes incl. block padding + scales + mins) at
the group size, measured with the real packer on one row of the module's ``in_features``.
"""

from __future__ import annotations

import heapq
import logging
import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .formats import FORMATS, effective_group_size

log = logging.getLogger(__name__)

__all__ = ["layer_sensitivity", "allocate_bits", "quantize_mixed", "format_bits", "linear_sizes",
           "parse_menu", "menu_target", "bits_range", "plan_bits", "quantizable_linears", "WIDTH_FORMATS", "DEFAULT_CANDIDATES"]

DEFAULT_CANDIDATES = ("int2", "int3", "int4", "int8")
WIDTH_FORMATS = {2: "int2", 3: "int3", 4: "int4", 8: "int8"}  # --bits 2,4,8 menu entries

Progress = Callable[[int, int, str], None]  # (done, total, what)

_BITS_CACHE: dict[tuple[str, int, int], float] = {}


def format_bits(fmt: str, in_features: int, group_size: int) -> float:
    """Real stored bits per weight of ``fmt`` for a linear with ``in_features`` inputs at
    ``group_size`` (codes with block padding + scales + mins), from the real packer."""
    key = (fmt, int(in_features), int(group_size))
    if key not in _BITS_CACHE:
        from .formats import quantize

        qw = quantize(torch.zeros(1, in_features), fmt, group_size, search=False)
        _BITS_CACHE[key] = qw.bits_per_weight
    return _BITS_CACHE[key]


def _fits(fmt: str, in_features: int, group_size: int) -> bool:
    try:
        gs = effective_group_size(fmt, in_features, group_size)
    except ValueError:
        return False
    return in_features % gs == 0


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


def layer_sensitivity(model: nn.Module, calib: list[list[int]], candidates: Iterable[str] = DEFAULT_CANDIDATES,
                      group_size: int = 64, progress: Progress | None = None,
                      skip: Iterable[str] = ("lm_head", "embed")) -> dict[str, dict[str, float]]:
    """``{module: {fmt: mean KL}}`` for every quantizable linear and candidate format, each module
    quantized ALONE with RTN (restored afterwards), versus the float model on ``calib``.

    A candidate that cannot hold a module (in_features not a multiple of its group size) is left
    out of that module's dict. The model must be float (no QuantLinear among the measured modules).

    Cost: ~``len(modules) * len(candidates) / 2`` full forwards of ``calib`` (the layers from the
    module's layer on, plus the head) plus one RTN per (module, format); int2/int3 RTN runs its
    clipping search (0.3-5 s for one of SmolLM2's larger linears). SmolLM2-135M: 120 modules x 4
    formats = 480 measurements; one float forward of 128 tokens through the 30 layers cost ~5
    CPU-s on the (heavily shared) 2-core test machine, so 4 x 128 tokens is on the order of
    half an hour of CPU there; the CLI's ``--sens-seqs`` / ``--sens-len`` trade accuracy for time.
    """
    from .linear import QuantLinear

    candidates = tuple(candidates)
    for c in candidates:
        if c not in FORMATS:
            raise ValueError(f"unknown candidate format {c!r}; known: {', '.join(sorted(FORMATS))}")
    if not calib or not all(len(s) >= 2 for s in calib):
        raise ValueError("layer_sensitivity needs calibration sequences of at least 2 tokens")
    mods = quantizable_linears(model, skip)
    if not mods:
        raise ValueError("the model has no float linear to measure (already quantized?)")
    was_training = model.training
    model.eval()
    runner = _Runner(model, calib)
    jobs = [(n, f) for n, lin in mods.items() for f in candidates if _fits(f, lin.in_features, group_size)]
    out: dict[str, dict[str, float]] = {n: {} for n in mods}
    for i, (name, fmt) in enumerate(jobs):
        lin = mods[name]
        _set_module(model, name, QuantLinear.from_linear(lin, fmt, group_size))
        try:
            out[name][fmt] = runner.mean_kl(_layer_index(name))
        finally:
            _set_module(model, name, lin)
        if progress is not None:
            progress(i + 1, len(jobs), f"{name} {fmt}")
    model.train(was_training)
    return {n: d for n, d in out.items() if d}


# ---- allocation --------------------------------------------------------------------------------
def parse_menu(menu: Iterable[Any] | str | None) -> tuple[str, ...] | None:
    """``"2,4,8"`` / ``[2, 4, 8]`` / ``["int4", "fp8"]`` -> format names (widths map through
    ``WIDTH_FORMATS``: 2 -> int2, 3 -> int3, 4 -> int4, 8 -> int8)."""
    if menu is None:
        return None
    items = [s.strip() for s in menu.split(",")] if isinstance(menu, str) else list(menu)
    out: list[str] = []
    for it in items:
        if isinstance(it, str) and it in FORMATS:
            f = it
        else:
            try:
                w = float(it)
            except (TypeError, ValueError):
                raise ValueError(f"bits menu entry {it!r} is neither a width ({', '.join(map(str, WIDTH_FORMATS))}) "
                                 f"nor a format ({', '.join(sorted(FORMATS))})") from None
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


def menu_target(sizes: dict[str, Any], menu: Iterable[Any] | str, group_size: int = 64) -> float:
    """The default target of a menu without ``--bits X``: the mean over the menu's formats of
    each format's model-average real bits per weight (modules it cannot hold are left out)."""
    fmts = parse_menu(menu)
    per_fmt = []
    for f in fmts:
        bits = cnt = 0.0
        for v in sizes.values():
            n, k = _size(v)
            k = k if k is not None else 1024
            if _fits(f, k, group_size):
                bits += format_bits(f, k, group_size) * n
                cnt += n
        if cnt:
            per_fmt.append(bits / cnt)
    if not per_fmt:
        raise ValueError(f"no format of the menu {', '.join(fmts)} fits these modules at group size {group_size}")
    return sum(per_fmt) / len(per_fmt)


def bits_range(sizes: dict[str, Any], menu: Iterable[Any] | str | None = None,
               group_size: int = 64) -> tuple[float, float]:
    """(lowest, highest) average real bits per weight reachable with the menu (default: the
    int2/int3/int4/int8 candidates); a module no format fits is left out."""
    fmts = parse_menu(menu) or DEFAULT_CANDIDATES
    lo = hi = tot = 0.0
    for v in sizes.values():
        n, k = _size(v)
        k = k if k is not None else 1024
        b = [format_bits(f, k, group_size) for f in fmts if _fits(f, k, group_size)]
        if b:
            lo += min(b) * n
            hi += max(b) * n
            tot += n
    if not tot:
        raise ValueError(f"no format of {', '.join(fmts)} fits these modules at group size {group_size}")
    return lo / tot, hi / tot


def allocate_bits(sensitivity: dict[str, dict[str, float]], sizes: dict[str, Any],
                  target_bits: float | None = None, menu: Iterable[Any] | str | None = None,
                  group_size: int = 64) -> tuple[dict[str, str], float]:
    """One format per module minimizing the summed sensitivity subject to
    ``sum(bits(fmt_m) * params_m) / sum(params_m) <= target_bits``.

    ``sizes[m]`` is ``(out_features, in_features)`` (exact bits per weight from the packer at
    ``group_size``) or a parameter count (bits taken for in_features = 1024). ``menu`` restricts
    the formats (widths 2/3/4/8 or format names). With a menu and no target the target is the
    mean of the menu formats' model-average bits per weight (e.g. 2,4,8 at group 64 ~= (2.5 + 4.5
    + 8.25) / 3 = 5.08), i.e. the budget of using each width equally, spent where it helps most.

    Algorithm (deterministic): per module, the lower convex hull of (bits, sensitivity); start
    every module at its cheapest format; repeatedly take the hull step with the largest
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
    pts: dict[str, list[tuple[float, float, str]]] = {}  # name -> [(total bits, sens, fmt)] by bits
    params: dict[str, int] = {}
    for n in names:
        cnt, k = _size(sizes[n])
        params[n] = cnt
        opts = []
        for f, s in sensitivity[n].items():
            if fmts is not None and f not in fmts:
                continue
            if f not in FORMATS:
                raise ValueError(f"unknown format {f!r} in the sensitivity of {n}")
            kk = k if k is not None else 1024
            if not _fits(f, kk, group_size):
                continue
            s = float(s)
            if not math.isfinite(s):
                continue
            opts.append((format_bits(f, kk, group_size) * cnt, s, f))
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


def plan_bits(plan: dict[str, str], sizes: dict[str, Any], group_size: int = 64) -> float:
    """Average real bits per weight of a plan (weighted by parameter count)."""
    tot = bits = 0.0
    for n, f in plan.items():
        cnt, k = _size(sizes[n])
        bits += format_bits(f, k if k is not None else 1024, group_size) * cnt
        tot += cnt
    return bits / tot if tot else 0.0


# ---- applying a plan ---------------------------------------------------------------------------
def quantize_mixed(model: nn.Module, plan: dict[str, str], group_size: int = 64, method: str = "rtn",
                   calib: list[list[int]] | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Quantize (in place) every module of ``plan`` to its format with ``method`` (rtn | gptq |
    awq; gptq/awq need ``calib``). Modules not in the plan stay as they are. Returns
    ``{"method", "plan", "modules": n, "stats": {fmt: what gptq/awq returned}}``."""
    from .linear import QuantLinear

    if method not in ("rtn", "gptq", "awq"):
        raise ValueError(f"unknown method {method!r}: use rtn, gptq or awq")
    mods = dict(model.named_modules())
    for n, f in plan.items():
        if f not in FORMATS:
            raise ValueError(f"plan: unknown format {f!r} for {n}; known: {', '.join(sorted(FORMATS))}")
        m = mods.get(n)
        if not isinstance(m, nn.Linear):
            raise ValueError(f"plan: {n!r} is not a float linear of this model")
        if not _fits(f, m.in_features, group_size):
            raise ValueError(f"plan: {n} has in_features={m.in_features}, not a multiple of {f}'s group size")
    stats: dict[str, Any] = {}
    if method == "rtn":
        for i, (n, f) in enumerate(plan.items()):
            _set_module(model, n, QuantLinear.from_linear(mods[n], f, group_size))
            if progress is not None:
                progress(i + 1, len(plan), n)
    else:
        if not calib:
            raise ValueError(f"method {method} needs calibration sequences (calib=...)")
        if method == "gptq":
            from .gptq import gptq_quantize_model as run
        else:
            from .awq import awq_quantize_model as run
        all_linear = [n for n, m in mods.items() if isinstance(m, nn.Linear)]
        by_fmt: dict[str, list[str]] = {}
        for n, f in plan.items():
            by_fmt.setdefault(f, []).append(n)
        for f in sorted(by_fmt):
            keep = set(by_fmt[f])
            # skip patterns are substrings of qualified names; a full name matches only itself
            skip = tuple(n for n in all_linear if n not in keep) + ("lm_head", "embed")
            skip = tuple(s for s in skip if not any(s in k for k in keep))
            stats[f] = run(model, f, group_size, calib, skip=skip, progress=progress)
        left = [n for n in plan if not isinstance(model.get_submodule(n), QuantLinear)]
        if left:
            raise RuntimeError(f"{method} left {len(left)} planned modules unquantized, e.g. {left[0]}")
    return {"method": method, "plan": dict(plan), "modules": len(plan), "stats": stats}
