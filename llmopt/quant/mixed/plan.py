"""The planner: sensitivity, allocation and re-measurement in one call (:func:`plan_mixed`)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .allocation import _expand, allocate_bits, menu_target, parse_menu
from .sensitivity import _Runner, fisher_sensitivity, layer_sensitivity
from .spec import (
    DEFAULT_CANDIDATES,
    Progress,
    _dequantized,
    _layer_index,
    quantizable_linears,
)

log = logging.getLogger(__name__)

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
