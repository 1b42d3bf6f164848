"""``llmopt quantize``: quantize a model (RTN, GPTQ or AWQ; one format or mixed precision per layer),
measure size and held-out perplexity before/after, and write a checkpoint directory that
``LLM(DIR)`` / ``llmopt generate DIR`` load (see :mod:`llmopt.quant.checkpoint`).

The main CLI registers ``quantize_command`` lazily; heavy imports stay inside the function.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True, soft_wrap=True)

METHODS = ("rtn", "gptq", "awq")
CALIB_METHOD_FORMATS = ("int4", "int3", "int2", "int8", "w4a8")  # what gptq / awq can produce
EMBEDDING_MODES = ("auto", "quantized", "float")
FLOAT_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                "float32": "float32", "fp32": "float32"}


def parse_bits(bits: str | None) -> tuple[float | None, tuple[str, ...] | None]:
    """``--bits``: ``"3.5"`` -> (3.5, None) (target over int2/int3/int4/int8); ``"2,4,8"`` ->
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


class _Bars:
    """rich progress on stderr; ``cb(label)`` gives a ``(done, total, what)`` callback."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TextColumn("[dim]{task.fields[what]}"), console=err, transient=True)
        self.tasks: dict[str, Any] = {}

    def __enter__(self):
        self.p.__enter__()
        return self

    def __exit__(self, *exc):
        return self.p.__exit__(*exc)

    def step(self, label: str):
        """A one-shot step shown as a 0/1 bar; returns a function that completes it."""
        tid = self.p.add_task(label, total=1, what="")
        return lambda: self.p.update(tid, completed=1)

    def cb(self, label: str):
        tid = self.p.add_task(label, total=None, what="")

        def update(done: int, total: int, what: str = "") -> None:
            self.p.update(tid, completed=done, total=total, what=what)

        return update


def quantize_command(
    model: Annotated[str, typer.Argument(help="registry name, Hugging Face directory or .gguf file")],
    output: Annotated[Path, typer.Option("--output", "-o", help="checkpoint directory to write (LLM(DIR) loads it)")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="int4, int3, int2, int8, fp8, fp4, w8a8, w4a8 (ignored with --bits)")] = "int4",
    group_size: Annotated[Optional[int], typer.Option("--group-size", "-g", help="weights per scale group along in_features (grouped formats; "
                                                                   "default 64; with --bits and no -g: chosen per linear among the native sizes)")] = None,
    method: Annotated[str, typer.Option(help="rtn (round to nearest), gptq or awq (calibrated; int2/3/4/8, w4a8)")] = "rtn",
    bits: Annotated[Optional[str], typer.Option(help="mixed precision per layer: an average like 3.5 (real bits per weight incl. "
                                                     "scales, over int2/int3/int4/int8) or a menu like 2,4,8 or int4:g32,int3:g64 "
                                                     "(target = mean of the menu)")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the measurements (and the mixed plan) to this JSON file")] = None,
    calib_seqs: Annotated[int, typer.Option(help="gptq/awq calibration sequences", min=1)] = 32,
    seq_len: Annotated[int, typer.Option(help="gptq/awq calibration sequence length in tokens", min=16)] = 512,
    sensitivity_est: Annotated[str, typer.Option("--sensitivity", help="mixed: fisher (Fisher estimate + re-measurement, fast) or kl "
                                                                     "(measured KL of each linear alone, slow)")] = "fisher",
    refine: Annotated[int, typer.Option(help="mixed (fisher): re-measurement rounds of the plan", min=0)] = 1,
    sens_seqs: Annotated[Optional[int], typer.Option(help="mixed: calibration sequences of the per-layer sensitivity "
                                                          "(default 16 for fisher, 4 for kl)", min=1)] = None,
    sens_len: Annotated[int, typer.Option(help="mixed: their length in tokens", min=16)] = 128,
    ppl_texts: Annotated[int, typer.Option(help="held-out texts scored for perplexity (0 = skip perplexity)", min=0)] = 8,
    ppl_tokens: Annotated[int, typer.Option(help="tokens scored per held-out text", min=16)] = 256,
    skip: Annotated[str, typer.Option(help="comma-separated substrings of module names kept in float (lm_head: see --lm-head)")] = "lm_head,embed",
    lm_head: Annotated[str, typer.Option("--lm-head", help="lm_head format (RTN, group --group-size): int8 (the engine's default), "
                                                          "another format, or float; overrides --skip for lm_head")] = "int8",
    embedding: Annotated[str, typer.Option(help="input embedding: auto (tied models: shares the quantized lm_head's tensors; "
                                                "untied: float), quantized (untied too, in the lm_head format), float")] = "auto",
    float_dtype: Annotated[str, typer.Option(help="storage of the float tensors (embeddings, norms): bfloat16, float16 or float32")] = "bfloat16",
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: all cores)", min=1)] = None,
    seed: Annotated[int, typer.Option(help="seed of the calibration windows")] = 0,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="reload the written checkpoint and check its logits are identical")] = True,
    force: Annotated[bool, typer.Option("--force", help="write into a non-empty output directory")] = False,
) -> None:
    """Quantize a model and write a checkpoint directory; prints size, compression vs BF16,
    held-out perplexity before/after and the time taken."""
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
    with _Bars() as bars:
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
        "command": "llmopt " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
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
    _print_table(result)
    if json_out is not None:
        json_out = Path(json_out)
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        err.print(f"wrote {json_out}")


def _print_table(r: dict[str, Any]) -> None:
    from rich.table import Table

    def mb(n: int) -> str:
        return f"{n / 1e6:.1f} MB ({n:,} B)"

    def ppl(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    title = f"{r['model']} -> {r['output']}: {r['format']} ({r['method']}, group {r['group_size']})"
    t = Table(title=title, show_header=True)
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row("bits per weight (quantized linears + embedding)",
              f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] else "-")
    t.add_row("lm_head / embedding", f"{r['lm_head_format'] or 'float'} / {r['embedding_format'] or 'float'}"
                                     + (" (shared)" if r["embedding_shared_with_lm_head"] else ""))
    t.add_row("bits per parameter (whole checkpoint)", f"{r['bits_per_weight_all_params']:.3f}")
    t.add_row("size of model.safetensors", mb(r["size_bytes"]))
    t.add_row("BF16 size (2 B x all parameters)", mb(r["bf16_bytes"]))
    t.add_row("compression vs BF16", f"{r['compression_vs_bf16']:.2f}x")
    t.add_row("perplexity before", ppl(r["ppl_before"]))
    t.add_row("perplexity after", ppl(r["ppl_after"]))
    if r["ppl_before"] and r["ppl_after"]:
        t.add_row("perplexity change", f"{100 * (r['ppl_after'] / r['ppl_before'] - 1):+.2f}%")
    if "plan_counts" in r:
        t.add_row("mixed plan", ", ".join(f"{k}: {v}" for k, v in r["plan_counts"].items()))
        t.add_row("target / achieved bits", f"{r['target_bits']:.3f} / "
                                            f"{r['plan_bits_per_weight']:.3f}")
    t.add_row("seconds", f"{r['seconds']:.1f} ({', '.join(f'{k} {v:.1f}' for k, v in r['seconds_by_phase'].items())})")
    out = console if console.is_terminal else Console(width=160)
    out.print(t)
