"""How much each linear hurts in each candidate: measured KL (:func:`layer_sensitivity`) or the Fisher estimate (:func:`fisher_sensitivity`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from .spec import (
    DEFAULT_CANDIDATES,
    Progress,
    _dequantized,
    _layer_index,
    _per_module,
    parse_spec,
    quantizable_linears,
)

log = logging.getLogger(__name__)

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
    from ..linear import QuantLinear

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
        model.set_submodule(name, QuantLinear.from_linear(lin, fmt, gs))
        try:
            out[name][spec] = runner.mean_kl(_layer_index(name))
        finally:
            model.set_submodule(name, lin)
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

    from ..linear import QuantLinear

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
