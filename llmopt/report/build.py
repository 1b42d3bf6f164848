"""``llmopt report``: a Markdown and an HTML report, with figures, from saved runs.

The report holds, for every eval run, its command, configuration and a table of suite metrics
with 95% intervals; every comparison's deltas; and five figures (accuracy versus bits per
weight, throughput versus concurrency, latency percentiles, tokens per answer, accuracy versus
JCT over think budgets and early-exit thresholds with the unlimited run as reference), each captioned
with the run files and commands it came from. A figure the runs hold no data for is replaced
by a line saying so.
"""

from __future__ import annotations

import html
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import plots
from .runs import EvalRun, Runs, load_runs

log = logging.getLogger(__name__)


@dataclass
class ReportFiles:
    markdown: Path
    html: Path
    figures: list[Path]


class _Doc:
    """Blocks rendered twice: to Markdown and to HTML."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def para(self, text: str) -> None:
        self.blocks.append(("p", text))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", (header, rows)))

    def image(self, src: str, alt: str) -> None:
        self.blocks.append(("img", (src, alt)))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(("ul", items))

    def markdown(self) -> str:
        out: list[str] = []
        for kind, v in self.blocks:
            if kind == "h":
                out.append("#" * v[0] + " " + v[1])
            elif kind == "p":
                out.append(v)
            elif kind == "code":
                out.append("```\n" + v + "\n```")
            elif kind == "table":
                header, rows = v
                cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
                out.append("\n".join(
                    ["| " + " | ".join(cell(h) for h in header) + " |",
                     "|" + "---|" * len(header)]
                    + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]))
            elif kind == "img":
                out.append(f"![{v[1]}]({v[0]})")
            elif kind == "ul":
                out.append("\n".join(f"- {x}" for x in v))
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        e = html.escape
        out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
               "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
               "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
               "padding:3px 8px;font-size:90%}pre{background:#f4f4f4;padding:.6em;"
               "white-space:pre-wrap}img{max-width:100%}</style></head><body>"]
        for kind, v in self.blocks:
            if kind == "h":
                out.append(f"<h{v[0]}>{e(v[1])}</h{v[0]}>")
            elif kind == "p":
                out.append(f"<p>{_inline_code(v)}</p>")
            elif kind == "code":
                out.append(f"<pre>{e(v)}</pre>")
            elif kind == "table":
                header, rows = v
                out.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>"
                           + "".join("<tr>" + "".join(f"<td>{_inline_code(str(c))}</td>" for c in row)
                                     + "</tr>" for row in rows) + "</table>")
            elif kind == "img":
                out.append(f"<p><img src='{e(v[0])}' alt='{e(v[1])}'></p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{_inline_code(x)}</li>" for x in v) + "</ul>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"


def _inline_code(text: str) -> str:
    """Escape for HTML, turning `code` spans into <code>."""
    parts = text.split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p)
                   for i, p in enumerate(parts))


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _ci(pair: Any, digits: int = 3) -> str:
    if not pair:
        return "-"
    return f"[{_fmt(pair[0], digits)}, {_fmt(pair[1], digits)}]"


def suite_rows(data: dict[str, Any]) -> list[list[str]]:
    """One table row per suite of an eval run: suite, n, metric, value, 95% CI, format rate,
    mean tokens, p50 latency."""
    rows = []
    for name, s in data.get("suites", {}).items():
        if "ppl" in s:
            rows.append([name, str(s["n"]), "ppl", _fmt(s["ppl"], 2), _ci(s["ppl_ci95"], 2),
                         "-", f"{s['tokens']} scored", "-"])
            continue
        metric = "score" if name == "format" else "accuracy"
        value = _fmt(s[metric])
        extra = [k for k in s if k.startswith("pass@") and not k.endswith("_ci95") and k != "pass@1"]
        for k in extra:
            value += f" ({k} {_fmt(s[k])})"
        rows.append([name, str(s["n"]), metric, value, _ci(s[f"{metric}_ci95"]),
                     _fmt(s.get("format_rate")), _fmt(s.get("mean_tokens"), 1),
                     _fmt(s.get("latency_p50_s"), 2)])
    return rows


SUITE_HEADER = ["suite", "n", "metric", "value", "95% CI", "format rate", "mean tokens",
                "p50 latency (s)"]


def _eval_section(doc: _Doc, run: EvalRun) -> None:
    d = run.data
    cfg = d.get("config", {})
    doc.heading(3, f"{run.label}")
    doc.para(f"Saved run: `{run.path}`")
    doc.para("Command:")
    doc.code(run.command)
    doc.para(
        f"n={cfg.get('n')} per suite, seed={cfg.get('seed')}, samples={cfg.get('samples')}, "
        f"temperature={cfg.get('temperature')}, max_tokens={cfg.get('max_tokens')}, "
        f"shots={cfg.get('shots')}, bits/weight={_fmt(d.get('model', {}).get('bits_per_weight'), 2)}"
        f" ({d.get('model', {}).get('bits_per_weight_source', '?')}); created {d.get('created', '?')}; "
        f"generation {_fmt(d.get('generation', {}).get('tokens_per_s'), 2)} tokens/s over "
        f"{d.get('generation', {}).get('tokens', '?')} tokens."
    )
    doc.table(SUITE_HEADER, suite_rows(d))


def build_report(paths: list[Path], out_dir: Path, command: str | None = None) -> ReportFiles:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into ``out_dir``."""
    runs: Runs = load_runs([Path(p) for p in paths])
    if not runs.evals and not runs.benches and not runs.trainings:
        raise ValueError(f"no eval, bench or training run found in {', '.join(map(str, paths))}: "
                         "give directories or JSON files written by `llmopt eval --json` or "
                         "`llmopt bench`, or `llmopt train` run directories")
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    doc = _Doc()
    doc.heading(1, "llmopt report")
    doc.para(f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %z')}"
             + (f" by `{command}`" if command else "") + ".")
    doc.para("Saved runs read:")
    doc.bullets([f"`{r.path}` ({r.label}, eval)" for r in runs.evals]
                + [f"`{r.path}` ({r.label}, bench)" for r in runs.benches]
                + [f"`{r.path}` ({r.label}, training)" for r in runs.trainings])
    if runs.trainings:
        doc.heading(2, "Training runs")
        rows = []
        for t in runs.trainings:
            c = t.config
            lora = c.get("lora", {}) if isinstance(c.get("lora"), dict) else {}
            wall = sum(float(r.get("step_s", 0.0)) for r in t.records)
            key = "loss" if t.kind == "sft" else "reward"
            _, vals = t.series(key)
            tail = vals[-20:]
            rows.append([t.label, t.kind, str(len(t.records)), f"{wall / 60:.1f}",
                         f"{key} {_fmt(sum(tail) / len(tail)) if tail else '?'}",
                         f"{c.get('suites', '?')} (chunk {c.get('chunk', '?')})",
                         f"r={lora.get('rank', '?')}, layers >= {lora.get('first_layer', '?')}, lr={c.get('lr', '?')}"])
        doc.table(["run", "kind", "steps", "step time (min)", "last 20 steps", "data", "LoRA / optimizer"], rows)

    if runs.evals:
        doc.heading(2, "Evaluation runs")
        doc.para("Accuracy and format score intervals are Wilson 95% intervals over items; "
                 "perplexity intervals are bootstrap 95% intervals over documents.")
        for r in runs.evals:
            _eval_section(doc, r)
    if runs.comparisons:
        doc.heading(2, "Comparisons")
        for c in runs.comparisons:
            doc.para(f"`{c.candidate}` minus `{c.baseline}`, same items (saved run `{c.path}`):")
            doc.code(c.command)
            rows = []
            for suite, dl in c.deltas.items():
                p = dl.get("mcnemar", {}).get("p_value")
                rows.append([suite, dl["metric"], _fmt(dl["candidate"]), _fmt(dl["baseline"]),
                             _fmt(dl["delta"]), _ci(dl["delta_ci95"]), _fmt(p)])
            doc.table(["suite", "metric", "candidate", "baseline", "delta", "95% CI (paired bootstrap)",
                       "McNemar p"], rows)

    doc.heading(2, "Figures")
    figures: list[plots.Figure] = []
    specs = [
        ("accuracy_vs_bits.png", "Accuracy versus bits per weight",
         lambda p: plots.accuracy_vs_bits(runs.evals, p), "no eval run with bits per weight"),
        ("throughput_vs_concurrency.png", "Throughput versus concurrency",
         lambda p: plots.throughput_vs_concurrency(runs.benches, p), "no bench run given"),
        ("latency_percentiles.png", "Latency percentiles",
         lambda p: plots.latency_percentiles(runs.evals, runs.benches, p), "no latency recorded"),
        ("tokens_per_answer.png", "Tokens per answer",
         lambda p: plots.tokens_per_answer(runs.evals, p), "no generated answers"),
        ("accuracy_vs_jct.png", "Accuracy versus JCT over think budgets and early exit",
         lambda p: plots.accuracy_vs_jct(runs.evals, p), "no eval run with think-token records"),
        ("training_curves.png", "Training curves",
         lambda p: plots.training_curves(runs.trainings, p), "no training run given"),
    ]
    for filename, title, draw, missing in specs:
        doc.heading(3, title)
        fig = draw(fig_dir / filename)
        if fig is None:
            doc.para(f"Not drawn: {missing}.")
            continue
        figures.append(fig)
        doc.image(f"figures/{filename}", title)
        doc.para("Made from:")
        doc.bullets([f"{label}: saved run `{path}`, command `{cmd}`" for label, path, cmd in fig.sources])

    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(doc.markdown(), encoding="utf-8")
    html_path.write_text(doc.html("llmopt report"), encoding="utf-8")
    log.info("wrote %s, %s and %d figures", md_path, html_path, len(figures))
    return ReportFiles(md_path, html_path, [f.path for f in figures])
