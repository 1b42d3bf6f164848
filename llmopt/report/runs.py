"""Find and read saved runs: the JSON files that ``llmopt eval`` and ``llmopt bench`` write.

Recognized files:

- an eval run: ``{"kind": "llmopt-eval", "suites": ..., "items": ...}`` (``llmopt eval --json``);
- an eval comparison: ``{"kind": "llmopt-eval-compare", "candidate": run, "baseline": run}``,
  read as its two runs plus its deltas;
- a bench run: ``{"kind": "llmopt-bench", "rows": [...]}`` (``llmopt bench --json``), or any
  JSON object holding a list of row objects that each have ``concurrency``
  and a throughput field (``output_tokens_per_s``, ``output_throughput``, ``tokens_per_s``,
  ``throughput`` or ``request_throughput``); latency fields named like ``ttft_p50_ms`` or
  ``p99_latency_s`` (any name containing p50/p90/p95/p99) are read as percentiles.

- a training run: a directory holding ``log.jsonl`` (one record per optimizer step) and
  ``config.json``, as ``llmopt train sft|grpo --out DIR`` writes them; GRPO records carry
  ``reward``, SFT records ``loss``.

Other JSON files are skipped with a log line, so a run directory may hold anything else too.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

THROUGHPUT_KEYS = ("output_tokens_per_s", "output_throughput", "tokens_per_s", "throughput",
                   "request_throughput")
_PCT_RE = re.compile(r"p(50|90|95|99)")


@dataclass
class EvalRun:
    path: Path
    label: str
    data: dict[str, Any]

    @property
    def command(self) -> str:
        return str(self.data.get("command") or "(command not recorded)")


@dataclass
class BenchRun:
    path: Path
    label: str
    command: str
    rows: list[dict[str, Any]]


@dataclass
class Comparison:
    path: Path
    command: str
    deltas: dict[str, Any]
    candidate: str
    baseline: str


@dataclass
class TrainRun:
    path: Path  # the run directory
    label: str
    kind: str  # "sft" or "grpo"
    config: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def command(self) -> str:
        return f"llmopt train {self.kind} --out {self.path} (settings: {self.path / 'config.json'})"

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one logged field, skipping records without it."""
        pts = [(int(r["step"]), float(r[key])) for r in self.records
               if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), int)]
        return [a for a, _ in pts], [b for _, b in pts]


@dataclass
class Runs:
    evals: list[EvalRun] = field(default_factory=list)
    trainings: list[TrainRun] = field(default_factory=list)
    benches: list[BenchRun] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


def _json_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*.json") if q.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"run path {p} does not exist: give run directories or JSON files")
    return list(dict.fromkeys(files))


def model_label(data: dict[str, Any]) -> str:
    m = data.get("model", {})
    quant = m.get("quant") or "fp32"
    return f"{Path(str(m.get('name', '?'))).name} [{quant}]"


def _bench_rows(obj: Any) -> list[dict[str, Any]] | None:
    if isinstance(obj, list):
        rows = [r for r in obj if isinstance(r, dict) and "concurrency" in r
                and any(k in r for k in THROUGHPUT_KEYS)]
        return rows or None
    if isinstance(obj, dict):
        for value in obj.values():
            rows = _bench_rows(value) if isinstance(value, list) else None
            if rows:
                return rows
    return None


def _train_run(run_dir: Path) -> TrainRun | None:
    log_path, cfg_path = run_dir / "log.jsonl", run_dir / "config.json"
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
        records = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        log.info("skipping training run %s: %s", run_dir, e)
        return None
    records = [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)]
    if not records or not isinstance(config, dict):
        return None
    kind = "grpo" if any("reward" in r for r in records) else "sft"
    return TrainRun(run_dir, f"{kind} {run_dir.name}", kind, config, records)


def _train_dirs(paths: list[Path]) -> list[Path]:
    dirs: list[Path] = []
    for p in map(Path, paths):
        logs = sorted(p.rglob("log.jsonl")) if p.is_dir() else [p] if p.name == "log.jsonl" else []
        dirs += [q.parent for q in logs if (q.parent / "config.json").is_file()]
    return list(dict.fromkeys(dirs))


def load_runs(paths: list[Path]) -> Runs:
    """Read every recognized run under ``paths`` (directories are searched recursively)."""
    runs = Runs()
    train_configs = set()
    for d in _train_dirs(paths):
        tr = _train_run(d)
        if tr is not None:
            runs.trainings.append(tr)
            train_configs.add(d / "config.json")
    for f in _json_files([p for p in paths if Path(p).name != "log.jsonl"]):
        if f in train_configs:
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            log.info("skipping %s: %s", f, e)
            runs.skipped.append(f)
            continue
        kind = data.get("kind") if isinstance(data, dict) else None
        where = f"{f.parent.name}/{f.stem}"
        if kind == "llmopt-eval":
            runs.evals.append(EvalRun(f, f"{model_label(data)} ({where})", data))
        elif kind == "llmopt-eval-compare":
            cand, base = data["candidate"], data["baseline"]
            runs.evals.append(EvalRun(f, f"{model_label(cand)} ({where}, candidate)", cand))
            runs.evals.append(EvalRun(f, f"{model_label(base)} ({where}, baseline)", base))
            runs.comparisons.append(Comparison(f, str(data.get("command") or ""), data["deltas"],
                                               model_label(cand), model_label(base)))
        elif kind == "llmopt-bench" or (rows := _bench_rows(data)) is not None:
            if kind == "llmopt-bench":
                rows = [r for r in data.get("rows", []) if isinstance(r, dict)]
            label = str(data.get("label") or data.get("model") or f.parent.name) \
                if isinstance(data, dict) else f.parent.name
            command = str(data.get("command") or "(command not recorded)") \
                if isinstance(data, dict) else "(command not recorded)"
            runs.benches.append(BenchRun(f, label, command, rows))
        else:
            log.info("skipping %s: not an eval or bench run", f)
            runs.skipped.append(f)
    return runs


def throughput_of(row: dict[str, Any]) -> tuple[str, float] | None:
    for k in THROUGHPUT_KEYS:
        if isinstance(row.get(k), (int, float)):
            return k, float(row[k])
    return None


def percentiles_of(row: dict[str, Any]) -> dict[str, float]:
    """Latency percentile fields of a bench row, by field name."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and _PCT_RE.search(k) and k != "concurrency"}
