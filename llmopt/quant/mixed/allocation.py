"""One candidate per linear under an average-bits budget (:func:`allocate_bits`) and the menus and targets it works from."""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Iterable
from typing import Any

from llmopt.formats.layouts import FORMATS

from .spec import (
    DEFAULT_CANDIDATES,
    WIDTH_FORMATS,
    _fits,
    candidate_specs,
    parse_spec,
    spec_bits,
    spec_name,
)

log = logging.getLogger(__name__)

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
