"""The report's figures, drawn with matplotlib (Agg, no display needed).

Each function draws one PNG from saved runs and returns a ``Figure`` naming the runs (file
and command) it came from, or None when the runs hold nothing to draw. Each PNG also carries
those sources in small print under the axes, so a figure copied out of the report still says
where it came from.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from .runs import BenchRun, EvalRun, TrainRun, percentiles_of, throughput_of

ACCURACY_SUITES = ("math", "logic", "code", "format")


@dataclass
class Figure:
    path: Path
    title: str
    sources: list[tuple[str, str, str]]  # (label, run file, command)


def _source_lines(sources: list[tuple[str, str, str]], width: int) -> list[str]:
    """Each saved run once (with its labels), then its full command, wrapped."""
    by_run: dict[tuple[str, str], list[str]] = {}
    for label, run, command in sources:
        by_run.setdefault((run, command), []).append(label)
    lines: list[str] = []
    for (run, command), labels in by_run.items():
        lines += textwrap.wrap(f"run {run}: {'; '.join(labels)}", width, subsequent_indent="    ")
        lines += textwrap.wrap(f"cmd {command}", width, subsequent_indent="    ")
    return lines


def _save(fig, path: Path, sources: list[tuple[str, str, str]]) -> None:
    """Save with the sources (saved run files and full commands) printed under the axes."""
    width = int(fig.get_figwidth() * 72 / 3.4) - 4  # monospace characters that fit at 5.5 pt
    lines = _source_lines(sources, width)
    footer = (0.12 + 0.095 * len(lines)) / fig.get_figheight()  # inches -> figure fraction
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=5.5, family="monospace", va="bottom", ha="left")
    fig.tight_layout(rect=(0, footer, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _eval_sources(runs: list[EvalRun]) -> list[tuple[str, str, str]]:
    return [(r.label, str(r.path), r.command) for r in runs]


def accuracy_vs_bits(runs: list[EvalRun], path: Path) -> Figure | None:
    """Accuracy (format: score) per suite against bits per weight, with 95% intervals; and a
    second panel with perplexity when the runs have it."""
    points: dict[str, list[tuple[float, float, float, float, str]]] = {}
    ppl: list[tuple[float, float, float, float]] = []
    used: list[EvalRun] = []
    for r in runs:
        bpw = r.data.get("model", {}).get("bits_per_weight")
        if bpw is None:
            continue
        suites = r.data.get("suites", {})
        for suite in ACCURACY_SUITES:
            s = suites.get(suite)
            if not s:
                continue
            metric = "score" if suite == "format" else "accuracy"
            lo, hi = s[f"{metric}_ci95"]
            shots = r.data.get("config", {}).get("shots") or 0
            series = f"{suite} ({shots}-shot)" if shots else suite  # one series per setup
            points.setdefault(series, []).append((float(bpw), s[metric], lo, hi, r.label))
        if suites.get("ppl"):
            lo, hi = suites["ppl"]["ppl_ci95"]
            ppl.append((float(bpw), suites["ppl"]["ppl"], lo, hi))
        if any(k in suites for k in (*ACCURACY_SUITES, "ppl")):
            used.append(r)
    if not points and not ppl:
        return None
    ncols = int(bool(points)) + int(bool(ppl))
    fig, axes = plt.subplots(1, ncols, figsize=(8 if ncols == 1 else 11, 5), squeeze=False)
    axes = list(axes[0])
    ticks = sorted({p[0] for pts in points.values() for p in pts} | {p[0] for p in ppl})

    def bits_axis(ax) -> None:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlim(min(ticks) / 1.5, max(ticks) * 1.5)
        ax.set_xlabel("bits per weight (log scale)")
        ax.grid(alpha=0.3)

    if points:
        ax = axes.pop(0)
        offsets = np.linspace(-0.08, 0.08, len(points)) if len(points) > 1 else [0.0]
        for off, (suite, pts) in zip(offsets, sorted(points.items())):
            pts.sort()
            x = np.array([p[0] for p in pts]) * 2.0 ** off  # shifted so intervals do not overlap
            y = np.array([p[1] for p in pts])
            err = np.array([[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]])
            ax.errorbar(x, y, yerr=err, marker="o", linestyle="none", capsize=3, label=suite)
        bits_axis(ax)
        ax.set_ylabel("accuracy (format: format score)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title("Accuracy vs bits per weight (95% intervals)")
        ax.legend(loc="upper left", fontsize=8)
    if ppl:
        ax = axes.pop(0)
        ppl.sort()
        err = np.array([[p[1] - p[2] for p in ppl], [p[3] - p[1] for p in ppl]])
        ax.errorbar([p[0] for p in ppl], [p[1] for p in ppl], yerr=err, marker="s",
                    linestyle="none", capsize=3, color="black")
        bits_axis(ax)
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title("Perplexity vs bits per weight (95% intervals)")
    sources = _eval_sources(used)
    _save(fig, path, sources)
    return Figure(path, "Accuracy versus bits per weight", sources)


def throughput_vs_concurrency(runs: list[BenchRun], path: Path) -> Figure | None:
    """Throughput against concurrency, one line per bench run (and input/output length)."""
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    ylabel = None
    for r in runs:
        groups: dict[str, list[tuple[float, float]]] = {}
        for row in r.rows:
            t = throughput_of(row)
            if t is None:
                continue
            ylabel = ylabel or t[0]
            shape = ", ".join(f"{k}={row[k]}" for k in ("input_len", "output_len", "backend")
                              if k in row)
            groups.setdefault(shape, []).append((float(row["concurrency"]), t[1]))
        for shape, pts in groups.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"{r.label} {shape}".strip())
    conc = sorted({float(row["concurrency"]) for r in runs for row in r.rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(conc, [f"{c:g}" for c in conc])
    ax.set_xlabel("concurrency")
    ax.set_ylabel(ylabel or "throughput")
    ax.set_title("Throughput vs concurrency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    sources = [(r.label, str(r.path), r.command) for r in runs]
    _save(fig, path, sources)
    return Figure(path, "Throughput versus concurrency", sources)


def latency_percentiles(evals: list[EvalRun], benches: list[BenchRun], path: Path) -> Figure | None:
    """p50/p90/p99 of per-request latency in eval runs (seconds), and the percentile fields
    bench runs report (in their own units, on a separate panel)."""
    eval_bars: list[tuple[str, dict[str, float]]] = []
    bench_bars: list[tuple[str, dict[str, float]]] = []
    sources: list[tuple[str, str, str]] = []
    for r in evals:
        lat = [it["latency_s"] for it in r.data.get("items", [])
               if it.get("suite") != "ppl" and not it.get("cached") and "latency_s" in it]
        if lat:
            pct = np.percentile(lat, [50, 90, 99])
            eval_bars.append((r.label, {"p50": pct[0], "p90": pct[1], "p99": pct[2]}))
            sources.append((r.label, str(r.path), r.command))
    for r in benches:
        rows = [(row, percentiles_of(row)) for row in r.rows]
        rows = [(row, p) for row, p in rows if p]
        for row, p in rows:
            backend = f" {row['backend']}" if "backend" in row else ""
            shape = f" in={row['input_len']}" if "input_len" in row else ""
            shape += f" out={row['output_len']}" if "output_len" in row else ""
            bench_bars.append((f"{r.label}{backend} c={row['concurrency']}{shape}", p))
        if rows:
            sources.append((r.label, str(r.path), r.command))
    panels = [(bars, ylabel) for bars, ylabel in
              ((eval_bars, "eval: seconds per request"), (bench_bars, "bench: field units"))
              if bars]
    if not panels:
        return None
    width_in = sum(max(3.5, 1.6 * len(b) + 1.0) for b, _ in panels) + 1
    fig, axes = plt.subplots(1, len(panels), figsize=(max(8, width_in), 5), squeeze=False)
    for ax, (bars, ylabel) in zip(axes[0], panels):
        keys = sorted({k for _, p in bars for k in p})
        width = 0.8 / len(keys)
        x = np.arange(len(bars))
        for i, k in enumerate(keys):
            ax.bar(x + i * width - 0.4 + width / 2, [p.get(k, np.nan) for _, p in bars], width,
                   label=k)
        ax.set_xticks(x, [textwrap.fill(b[0], 26) for b in bars], fontsize=6)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.suptitle("Latency percentiles")
    _save(fig, path, sources)
    return Figure(path, "Latency percentiles", sources)


def tokens_per_answer(runs: list[EvalRun], path: Path) -> Figure | None:
    """Distribution of generated tokens per answer, per suite and run."""
    data, labels, used = [], [], []
    for r in runs:
        by_suite: dict[str, list[int]] = {}
        for it in r.data.get("items", []):
            if it.get("suite") == "ppl" or it.get("cached"):
                continue
            by_suite.setdefault(it["suite"], []).append(it["tokens"])
        for suite, toks in sorted(by_suite.items()):
            data.append(toks)
            labels.append(textwrap.fill(r.label, 26) + f"\n{suite}")
        if by_suite:
            used.append(r)
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(data) + 1.5), 5))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=6)
    ax.set_ylabel("generated tokens per answer")
    ax.set_title("Tokens per answer (box: quartiles, triangle: mean)")
    ax.grid(alpha=0.3, axis="y")
    sources = _eval_sources(used)
    _save(fig, path, sources)
    return Figure(path, "Tokens per answer", sources)


def reasoning_setting(run: EvalRun) -> str | None:
    """"unlimited", "budget N", "early exit t", "loop exit", "low confidence p" (or several) for an eval run that recorded think
    tokens; None for a run without reasoning-efficiency records."""
    if not any("mean_think_tokens" in s for s in run.data.get("suites", {}).values()):
        return None
    cfg = run.data.get("config", {})
    parts = []
    if cfg.get("think_budget"):
        parts.append(f"budget {cfg['think_budget']}")
    if cfg.get("early_exit"):
        t = cfg.get("early_exit_threshold")
        parts.append(f"early exit {t if t is not None else 'default'}")
    if cfg.get("loop_exit"):
        parts.append("loop exit")
    if cfg.get("low_confidence_exit"):
        parts.append(f"low confidence {cfg['low_confidence_exit']}")
    if cfg.get("think_gate"):
        p = cfg.get("think_gate_threshold")
        parts.append(f"think gate {cfg['think_gate']}@{p if p is not None else 'default'}")
    if cfg.get("difficulty_exit"):
        k = cfg.get("difficulty_exit_tokens")
        parts.append(f"difficulty {cfg['difficulty_exit']}@{k if k is not None else 'default'}")
    if cfg.get("difficulty_budget"):
        p = cfg.get("difficulty_budget_threshold")
        parts.append(f"difficulty budget {cfg['difficulty_budget']}@{p if p is not None else 'default'}")
    return ", ".join(parts) or "unlimited"


def accuracy_vs_jct(runs: list[EvalRun], path: Path) -> Figure | None:
    """Accuracy (95% interval) against mean JCT per suite, one point per reasoning setting (think
    budgets, early-exit thresholds); the unlimited run is the reference, drawn as a star."""
    used = [(r, reasoning_setting(r)) for r in runs]
    used = [(r, s) for r, s in used if s is not None]
    if not used:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    suites = sorted({n for r, _ in used for n, s in r.data["suites"].items()
                     if "mean_jct_s" in s and "accuracy" in s})
    for color, suite in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], suites):
        for r, setting in used:
            s = r.data["suites"].get(suite)
            if not s or "mean_jct_s" not in s:
                continue
            y, (lo, hi) = s["accuracy"], s["accuracy_ci95"]
            ax.errorbar([s["mean_jct_s"]], [y], yerr=[[y - lo], [hi - y]], color=color, capsize=3,
                        marker="*" if setting == "unlimited" else "o", markersize=12 if setting == "unlimited" else 6,
                        linestyle="none")
            ax.annotate(f"{suite}: {setting}", (s["mean_jct_s"], y), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
    ax.set_xlabel("mean JCT per item (s)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Accuracy vs JCT over think budgets / early exit (star: unlimited)")
    ax.grid(alpha=0.3)
    sources = _eval_sources([r for r, _ in used])
    _save(fig, path, sources)
    return Figure(path, "Accuracy versus JCT (efficient reasoning)", sources)


def _moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def training_curves(runs: list[TrainRun], path: Path) -> Figure | None:
    """Training curves per run: SFT loss (raw and moving average) and learning rate; GRPO reward,
    format rate and accuracy of the rollouts (moving averages) and KL to the base model."""
    if not runs:
        return None
    fig, axes = plt.subplots(len(runs), 2, figsize=(10, 3.4 * len(runs)), squeeze=False)
    for (ax_l, ax_r), run in zip(axes, runs):
        if run.kind == "sft":
            steps, loss = run.series("loss")
            ax_l.plot(steps, loss, alpha=0.3, linewidth=0.8, label="loss")
            ax_l.plot(steps, _moving_average(loss, 20), label="loss (20-step mean)")
            ax_l.set_ylabel("token NLL")
            steps_lr, lr = run.series("lr")
            ax_r.plot(steps_lr, lr, label="learning rate")
            ax_r.set_ylabel("learning rate")
            tps_steps, tps = run.series("tokens_per_s")
            if tps:
                ax_t = ax_r.twinx()
                ax_t.plot(tps_steps, _moving_average(tps, 20), color="tab:gray", alpha=0.6, label="tokens/s")
                ax_t.set_ylabel("training tokens/s (20-step mean)")
        else:
            for key in ("reward", "format_rate", "accuracy"):
                steps, vals = run.series(key)
                if vals:
                    ax_l.plot(steps, _moving_average(vals, 5), label=f"{key} (5-step mean)")
            ax_l.set_ylabel("rollout mean")
            steps, kl = run.series("kl")
            ax_r.plot(steps, kl, label="KL to base")
            ax_r.set_ylabel("KL (k3 estimate)")
        for ax in (ax_l, ax_r):
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
        ax_l.set_title(f"{run.label}: {len(run.records)} steps", fontsize=9)
    sources = [(r.label, str(r.path / "log.jsonl"), r.command) for r in runs]
    _save(fig, path, sources)
    return Figure(path, "Training curves", sources)
