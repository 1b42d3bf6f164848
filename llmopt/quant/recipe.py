"""The quantization pipeline as a recipe: what to do (:class:`QuantRecipe`) and doing it (:func:`run`).

``llmopt quantize`` only parses its arguments into a ``QuantRecipe`` and prints what ``run``
returns; Python callers build the recipe themselves. ``run`` validates everything before loading
anything, loads the model, measures held-out perplexity before and after, quantizes (RTN, GPTQ or
AWQ; one format, or mixed precision per linear), writes the checkpoint directory
(:mod:`llmopt.quant.checkpoint`) and, with ``verify``, reloads it and checks the logits are equal.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

METHODS = ("rtn", "gptq", "awq")
CALIB_METHOD_FORMATS = ("int4", "int3", "int2", "int8", "w4a8")  # what gptq / awq can produce
EMBEDDING_MODES = ("auto", "quantized", "float")
FLOAT_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                "float32": "float32", "fp32": "float32"}


@dataclass
class QuantRecipe:
    """One ``llmopt quantize`` run (the CLI options of the same names; see ``llmopt quantize --help``)."""

    model: str
    output: Path
    fmt: str = "int4"
    group_size: int | None = None  # None: 64, or chosen per linear with bits
    method: str = "rtn"  # rtn | gptq | awq
    bits: str | None = None  # mixed precision: an average ("3.5") or a menu ("2,4,8")
    calib_seqs: int = 32
    seq_len: int = 512
    sensitivity_est: str = "fisher"  # fisher | kl
    refine: int = 1
    sens_seqs: int | None = None  # None: 16 for fisher, 4 for kl
    sens_len: int = 128
    ppl_texts: int = 8
    ppl_tokens: int = 256
    skip: str = "lm_head,embed"
    lm_head: str = "int8"
    embedding: str = "auto"  # auto | quantized | float
    float_dtype: str = "bfloat16"
    threads: int | None = None
    seed: int = 0
    verify: bool = True
    force: bool = False


class Progress(Protocol):
    """How ``run`` reports progress (the CLI shows rich bars; the default shows nothing)."""

    def __enter__(self) -> Progress: ...

    def __exit__(self, *exc: object) -> Any: ...

    def step(self, label: str) -> Callable[[], None]:
        """A one-shot step; returns the function that marks it done."""
        ...

    def cb(self, label: str) -> Callable[..., None]:
        """A ``(done, total, what="")`` callback for a long phase."""
        ...


class NullProgress:
    def __enter__(self) -> NullProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def step(self, label: str) -> Callable[[], None]:
        return lambda: None

    def cb(self, label: str) -> Callable[..., None]:
        return lambda *a, **k: None


def parse_bits(bits: str | None) -> tuple[float | None, tuple[str, ...] | None]:
    """``bits``: ``"3.5"`` -> (3.5, None) (target over int2/int3/int4/int8); ``"2,4,8"`` ->
    (None, menu) (target = mean of the menu's bits, see ``mixed.allocate_bits``)."""
    from .mixed import WIDTH_FORMATS, parse_menu

    if bits is None:
        return None, None
    s = bits.strip()
    if "," in s:
        return None, parse_menu(s)
    try:
        t = float(s)
    except ValueError:
        raise ValueError(f"--bits {bits!r}: give an average like 3.5 or a menu of widths like 2,4,8") from None
    lo, hi = min(WIDTH_FORMATS), 16
    if not math.isfinite(t) or not lo < t <= hi:
        raise ValueError(f"--bits {bits}: the average bits per weight must be in ({lo}, {hi}] "
                         "(the smallest format, int2, stores 2 bits plus its scales)")
    return t, None


def _check_out_dir(out: Path, force: bool, model_path: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} exists and is not a directory")
    if out.resolve() == model_path.resolve() or (model_path.is_file() and out.resolve() == model_path.parent.resolve()
                                                 and any(out.iterdir())):
        raise ValueError(f"output directory {str(out)!r} is the input model's location: choose another -o")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"output directory {str(out)!r} exists and is not empty: choose another -o or pass --force "
                         "(files of the checkpoint are overwritten, others are left alone)")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(recipe: QuantRecipe, progress: Progress | None = None) -> dict[str, Any]:
    """Carry out ``recipe``; returns the measurements (sizes, perplexity before/after, times, and
    for mixed precision the plan and sensitivities). Raises ``ValueError`` for a recipe that cannot
    run, before loading the model."""
    model, output, fmt, group_size, method, bits, calib_seqs, seq_len, sensitivity_est, refine, sens_seqs, sens_len, ppl_texts, ppl_tokens, skip, lm_head, embedding, float_dtype, threads, seed, verify, force = (
        recipe.model, recipe.output, recipe.fmt, recipe.group_size, recipe.method, recipe.bits, recipe.calib_seqs, recipe.seq_len, recipe.sensitivity_est, recipe.refine, recipe.sens_seqs, recipe.sens_len, recipe.ppl_texts, recipe.ppl_tokens, recipe.skip, recipe.lm_head, recipe.embedding, recipe.float_dtype, recipe.threads, recipe.seed, recipe.verify, recipe.force)
    import torch

    from llmopt.formats.layouts import FORMATS, effective_group_size
    from llmopt.models.registry import resolve

    from .mixed import DEFAULT_CANDIDATES

    t_start = time.perf_counter()
    # ---- validate everything before loading anything ----------------------------------------
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use {', '.join(METHODS)}")
    target, menu = parse_bits(bits)
    mixed = bits is not None
    if not mixed and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if not mixed and method != "rtn" and fmt not in CALIB_METHOD_FORMATS:
        raise ValueError(f"--method {method} supports {', '.join(CALIB_METHOD_FORMATS)}, not {fmt}: use --method rtn")
    candidates = menu or DEFAULT_CANDIDATES
    if sensitivity_est not in ("fisher", "kl"):
        raise ValueError(f"--sensitivity {sensitivity_est!r}: use fisher or kl")
    per_module_gs = mixed and group_size is None  # --bits without -g: group size chosen per linear
    group_size = 64 if group_size is None else group_size
    if sens_seqs is None:
        sens_seqs = 16 if sensitivity_est == "fisher" else 4
    if group_size <= 0 or group_size % 8:
        raise ValueError(f"--group-size {group_size}: must be a positive multiple of 8 (e.g. 32, 64, 128)")
    lm_head = lm_head.strip().lower()
    if lm_head not in FORMATS and lm_head not in ("float", "none"):
        raise ValueError(f"--lm-head {lm_head!r}: use float or one of {', '.join(FORMATS)}")
    head_fmt = None if lm_head in ("float", "none") else lm_head
    if embedding not in EMBEDDING_MODES:
        raise ValueError(f"--embedding {embedding!r}: use {', '.join(EMBEDDING_MODES)}")
    if float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"--float-dtype {float_dtype!r}: use bfloat16, float16 or float32")
    fdtype = getattr(torch, FLOAT_DTYPES[float_dtype])
    skips = tuple(s.strip() for s in skip.split(",") if s.strip())
    if method != "rtn":  # fail now if the calibrated method is not part of this build
        import importlib

        importlib.import_module(f"llmopt.quant.{method}")
    src = resolve(model)  # ModelLoadError (one line) if missing
    if (src / "quant_config.json").exists() if src.is_dir() else False:
        raise ValueError(f"{model} is already an llmopt quantized checkpoint: quantize the original (float or GGUF) "
                         "model instead")
    _check_out_dir(output, force, src)
    if threads:
        torch.set_num_threads(threads)

    from llmopt.config import KernelSettings

    from . import calib as calib_mod
    from .checkpoint import WEIGHTS_FILE, load_quantized, round_float_weights_, save_quantized
    from .linear import quantize_model
    from .mixed import bits_range, linear_sizes, plan_mixed, quantizable_linears, quantize_mixed

    times: dict[str, float] = {}
    result: dict[str, Any] = {}
    with progress or NullProgress() as bars:
        done = bars.step(f"load {model}")
        t = time.perf_counter()
        from llmopt.models.loader import load_model

        lm = load_model(model)
        net, tok, cfg = lm.model, lm.tokenizer, lm.config
        done()
        times["load"] = time.perf_counter() - t
        targets = quantizable_linears(net, skips)
        if not targets:
            raise ValueError(f"--skip {skip!r} leaves no linear layer to quantize")
        # group size must divide every target's in_features for the formats that use it
        for f in (() if per_module_gs else candidates if mixed else (fmt,)):
            bad = []
            for n, m in targets.items():
                try:
                    gs = effective_group_size(f, m.in_features, group_size)
                except ValueError as e:
                    raise ValueError(f"--group-size {group_size}: {e}") from None
                if m.in_features % gs:
                    bad.append((n, m.in_features))
            if bad:
                ks = sorted({k for _, k in bad} | {m.in_features for m in targets.values()})
                raise ValueError(f"--group-size {group_size} does not divide in_features={bad[0][1]} of {bad[0][0]} "
                                 f"({len(bad)} linears): use a group size that divides {', '.join(map(str, ks))}")
        # lm_head (RTN in --lm-head, after the body whatever the method) and the input embedding
        head_ok = head_fmt is not None and cfg.hidden_size % effective_group_size(head_fmt, cfg.hidden_size, group_size) == 0
        tied = bool(cfg.tie_word_embeddings)
        if embedding == "quantized" and tied and not head_ok:
            raise ValueError("--embedding quantized: the embedding of this tied model is quantized by sharing the "
                             "quantized lm_head, which stays float here" +
                             ("" if head_fmt is None else f" (--group-size {group_size} does not divide "
                                                          f"hidden_size={cfg.hidden_size})") + ": give --lm-head int8")
        quant_embed = {"auto": KernelSettings.from_env().quant_embed and tied and head_ok, "quantized": True, "float": False}[embedding]
        head_kw = dict(quantize_lm_head=head_fmt is not None, lm_head_fmt=head_fmt, quantize_embedding=quant_embed,
                       embedding_fmt=(head_fmt or "int8") if quant_embed else None)
        n_params = sum(p.numel() for p in net.parameters())  # tied weights counted once
        bf16_bytes = 2 * n_params
        texts = calib_mod.heldout_texts()[:ppl_texts] if ppl_texts else []

        ppl_before = None
        if texts:
            done = bars.step(f"perplexity before ({len(texts)} texts x {ppl_tokens} tokens)")
            t = time.perf_counter()
            ppl_before = calib_mod.perplexity(net, tok, texts, max_tokens=ppl_tokens)
            times["ppl_before"] = time.perf_counter() - t
            done()

        calib = None
        if method != "rtn":
            calib = calib_mod.calibration_batches(tok, n_seqs=calib_seqs, seq_len=seq_len, seed=seed)

        t = time.perf_counter()
        plan = sensitivity = None
        stats: Any = None
        if mixed:
            sizes = linear_sizes(net, skips)
            mgs = None if per_module_gs else group_size
            lo, _ = bits_range(sizes, candidates, mgs)
            if target is not None and target < lo:
                raise ValueError(f"--bits {bits}: the lowest average this model reaches with "
                                 f"{', '.join(candidates)} at group size {mgs or 'per linear'} is {lo:.3f} bits per "
                                 "weight (scales included): raise --bits")
            sens_calib = calib_mod.calibration_batches(tok, n_seqs=sens_seqs, seq_len=sens_len, seed=seed)
            ts = time.perf_counter()
            mp = plan_mixed(net, sens_calib, target_bits=target, menu=candidates, group_size=mgs,
                            estimator=sensitivity_est, refine=refine if sensitivity_est == "fisher" else 0,
                            seed=seed, skip=skips,
                            progress=bars.cb(f"sensitivity ({sensitivity_est}) + allocation"))
            times["sensitivity"] = time.perf_counter() - ts
            sensitivity, plan, achieved, target_used = mp["sensitivity"], mp["plan"], mp["bits"], mp["target_bits"]
            stats = quantize_mixed(net, plan, group_size, method=method, calib=calib,
                                   progress=bars.cb(f"quantize mixed ({method})"))
            stats = stats.get("stats")
        elif method == "rtn":
            done = bars.step(f"quantize {fmt} (rtn)")
            quantize_model(net, fmt, group_size=group_size, skip=skips, **head_kw)
            done()
        elif method == "gptq":
            from .gptq import gptq_quantize_model

            stats = gptq_quantize_model(net, fmt, group_size, calib, skip=skips, progress=bars.cb(f"gptq {fmt}"))
        else:
            from .awq import awq_quantize_model

            stats = awq_quantize_model(net, fmt, group_size, calib, skip=skips, progress=bars.cb(f"awq {fmt}"))
        if mixed or method != "rtn":  # the head and the embedding only ("" is in every name: body skipped)
            quantize_model(net, fmt if fmt in FORMATS else "int4", group_size=group_size, skip=("",), **head_kw)
        times["quantize"] = time.perf_counter() - t - times.get("sensitivity", 0.0)
        round_float_weights_(net, fdtype)  # measure exactly what is saved

        ppl_after = None
        if texts:
            done = bars.step("perplexity after")
            t = time.perf_counter()
            ppl_after = calib_mod.perplexity(net, tok, texts, max_tokens=ppl_tokens)
            times["ppl_after"] = time.perf_counter() - t
            done()

        done = bars.step(f"write {output}")
        t = time.perf_counter()
        info = {"method": method, "format": "mixed" if mixed else fmt, "group_size": None if per_module_gs else group_size,
                "source": str(src), "skip": list(skips), "lm_head": lm_head, "embedding": embedding,
                "calibration": ({"seqs": calib_seqs, "seq_len": seq_len, "seed": seed} if calib else None)}
        if mixed:
            info.update({"target_bits": target, "menu": list(menu) if menu else None,
                         "sensitivity": sensitivity_est, "refine": refine,
                         "sensitivity_calibration": {"seqs": sens_seqs, "seq_len": sens_len, "seed": seed}})
        qc = save_quantized(net, tok, cfg, output, info, float_dtype=fdtype)
        times["save"] = time.perf_counter() - t
        done()

        if verify:
            done = bars.step("verify reload")
            back = load_quantized(output)
            ids = torch.tensor((tok.encode("The quick brown fox jumps over the lazy dog.") * 4)[:48], dtype=torch.long)
            pos = torch.arange(len(ids))
            with torch.inference_mode():
                a = net.compute_logits(net(ids, pos))
                b = back.model.compute_logits(back.model(ids, pos))
            if not torch.equal(a, b):
                raise RuntimeError(f"the checkpoint written to {output} does not reload to the same model "
                                   f"(max logit difference {float((a - b).abs().max()):.3g}); please report this")
            del back
            done()

    size_bytes = (output / WEIGHTS_FILE).stat().st_size
    seconds = time.perf_counter() - t_start
    result = {
        "model": model,
        "source": str(src),
        "output": str(output),
        "format": "mixed" if mixed else fmt,
        "method": method,
        "group_size": "per linear" if per_module_gs else group_size,
        "bits_per_weight": qc["avg_bits_per_weight"],
        "bits_per_weight_all_params": qc["avg_bits_all_params"],
        "size_bytes": size_bytes,
        "dir_bytes": _dir_bytes(output),
        "bf16_bytes": bf16_bytes,
        "params": n_params,
        "quantized_params": qc["quantized_params"],
        "lm_head_format": qc["lm_head_format"],
        "embedding_format": qc["embedding_format"],
        "embedding_shared_with_lm_head": qc["embedding_shared_with_lm_head"],
        "compression_vs_bf16": bf16_bytes / size_bytes,
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
        "ppl_texts": len(texts),
        "ppl_tokens_per_text": ppl_tokens,
        "float_dtype": FLOAT_DTYPES[float_dtype],
        "seconds": seconds,
        "seconds_by_phase": {k: round(v, 3) for k, v in times.items()},
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if mixed:
        from collections import Counter

        result.update({
            "target_bits": target_used,
            "target_from": "--bits" if target is not None else "mean of the menu formats' bits per weight",
            "menu": list(menu) if menu else None,
            "plan_bits_per_weight": achieved,
            "plan_counts": dict(sorted(Counter(plan.values()).items())),
            "plan": plan,
            "sensitivity_estimator": sensitivity_est,
            "calib_kl": mp["calib_kl"],
            "refine_rounds": mp["rounds"],
            "sensitivity": sensitivity,
        })
    if stats is not None:
        result["method_stats_seconds"] = (stats.get("seconds") if isinstance(stats, dict) and "seconds" in stats else None)
    return result
