"""Applying a plan: RTN, GPTQ (the shared layer loop of ``quant.gptq``) or AWQ per candidate (:func:`quantize_mixed`)."""

from __future__ import annotations

import logging
import time
from typing import Any

from torch import nn

from .spec import (
    Progress,
    _fits,
    _layer_index,
    parse_spec,
    spec_name,
)

log = logging.getLogger(__name__)

# ---- applying a plan ---------------------------------------------------------------------------
def _gptq_mixed(model: nn.Module, plan: dict[str, tuple[str, int | None]], calib, progress: Progress | None):
    """GPTQ of every planned module at its own format + group size, in one sequential pass (the
    scheme of ``gptq.gptq_quantize_model``: each Hessian from inputs computed with every earlier
    module already quantized)."""
    from llmopt.formats.layouts import dequantize

    from ..gptq import check_model_and_calib, gptq_layer_loop, gptq_quantize_weight, gram, output_error
    from ..linear import QuantLinear

    check_model_and_calib(model, calib)
    t0 = time.perf_counter()
    stats: dict[str, Any] = {"method": "gptq", "tokens": sum(len(s) for s in calib), "layers": {}}

    def on_linear(name: str, inputs: list) -> None:
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
        model.set_submodule(name, QuantLinear(qw, bias).to(W.device))

    last = max(_layer_index(n) for n in plan)
    gptq_layer_loop(model, calib, on_linear, progress, label="gptq mixed", num_layers=last + 1)
    stats["seconds"] = time.perf_counter() - t0
    return stats


def quantize_mixed(model: nn.Module, plan: dict[str, str], group_size: int | None = 64, method: str = "rtn",
                   calib: list[list[int]] | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Quantize (in place) every module of ``plan`` to its candidate (format at ``group_size`` or
    ``"fmt:gN"``) with ``method`` (rtn | gptq | awq; gptq/awq need ``calib``). Modules not in the
    plan stay as they are. GPTQ runs once over the layers with each module's own format and group
    size; AWQ runs once per distinct (format, group size). Returns ``{"method", "plan", "modules":
    n, "stats"}`` (gptq: its per-module stats; awq: ``{candidate: what awq returned}``)."""
    from ..linear import QuantLinear

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
            model.set_submodule(n, QuantLinear.from_linear(mods[n], fmt, gs))
            if progress is not None:
                progress(i + 1, len(plan), n)
    else:
        if not calib:
            raise ValueError(f"method {method} needs calibration sequences (calib=...)")
        if method == "gptq":
            from ..gptq import GPTQ_FORMATS

            bad = sorted({f for f, _ in parsed.values() if f not in GPTQ_FORMATS})
            if bad:
                raise ValueError(f"GPTQ supports {', '.join(GPTQ_FORMATS)}; the plan has {', '.join(bad)}")
            if any(_layer_index(n) is None for n in parsed):
                raise ValueError("gptq: every planned module must be inside a decoder layer (layers.<i>.)")
            if parsed:
                stats = _gptq_mixed(model, parsed, calib, progress)
        else:
            from ..awq import awq_quantize_model as run

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
