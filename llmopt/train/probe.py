"""``llmopt train probe``: fit a difficulty probe (``llmopt.reasoning.difficulty``) on a model's own answers.

For every seed the model answers ``n`` items per suite (reasoning-gym math / logic, or any ``rg:TASK``)
greedily with unlimited thinking (up to ``max_tokens``); the verifiers grade them. The examples are the
outputs still thinking after ``think_tokens`` tokens (the ones a difficulty exit at that count could cut),
labelled wrong (1) or right (0); the feature is the final-norm hidden state at the prompt's last token.
A logistic regression with an L2 penalty is fitted on all seeds; with two or more seeds, each seed is
also left out in turn and scored by a fit on the others (the AUC printed and stored in the probe's
metadata), so the file says how well it ranks unseen items.

The seeds are eval-item seeds (``llmopt eval --seed``): held-out measurements of the probe must use
others. Answers and states are kept per seed in ``records_dir`` (JSONL + a tensor file), so a run that
stops resumes there and a refit with another ``l2`` or ``think_tokens`` reuses them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmopt.reasoning.difficulty import PROBE_LABEL_TOKENS, auc, fit_probe


@dataclass
class ProbeConfig:
    model: str
    out: str  # the probe file (.safetensors)
    seeds: tuple[int, ...] = (9004, 9008)
    suites: tuple[str, ...] = ("math", "logic")
    n: int = 200  # items per suite and seed
    think_tokens: int = PROBE_LABEL_TOKENS  # examples: outputs still thinking after this many tokens
    l2: float = 10.0
    max_tokens: int = 512
    concurrency: int = 16
    quant: str | None = None
    adapter: str | None = None
    num_threads: int | None = None
    records_dir: str | None = None  # None: OUT without its suffix + ".records"
    meta: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct eval seeds, at least one, got {list(self.seeds)}")
        if not self.suites:
            raise ValueError("suites must name at least one suite (math, logic, rg:TASK)")
        bad = [s for s in self.suites if s not in ("math", "logic") and not s.startswith("rg:")]
        if bad:
            raise ValueError(f"a difficulty probe learns from graded reasoning answers: suites are math, logic or "
                             f"rg:TASK, got {bad}")
        for name, v, lo in (("n", self.n, 1), ("think_tokens", self.think_tokens, 1), ("max_tokens", self.max_tokens, 2),
                            ("concurrency", self.concurrency, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not self.l2 > 0:
            raise ValueError(f"l2 must be > 0, got {self.l2}")
        if not str(self.out).endswith(".safetensors"):
            raise ValueError(f"the probe file is safetensors: --out must end in .safetensors, got {self.out!r}")

    @property
    def records_path(self) -> Path:
        if self.records_dir is not None:
            return Path(self.records_dir)
        out = Path(self.out)
        return out.with_name(out.name.removesuffix(".safetensors") + ".records")


def records_files(cfg: ProbeConfig, seed: int) -> tuple[Path, Path]:
    """Where one seed's graded answers (JSONL) and prompt states (tensor file) are kept."""
    stem = f"seed{seed}_n{cfg.n}_{'+'.join(cfg.suites).replace(':', '-')}_max{cfg.max_tokens}"
    return cfg.records_path / f"{stem}.jsonl", cfg.records_path / f"{stem}.pt"


def _collect(engine: Any, cfg: ProbeConfig, seed: int, progress: Callable[[int], None] | None) -> tuple[list[dict], torch.Tensor]:
    """The graded unlimited answers of one seed's items and their prompt states (cached in records_dir)."""
    from llmopt.batch.runner import answer
    from llmopt.engine.sampling_params import SamplingParams
    from llmopt.reasoning.format import extract_answer
    from llmopt.tasks.evaluate import EvalConfig, build_items
    from llmopt.tasks.mathlogic import reasoning_gym_suite

    rec_file, state_file = records_files(cfg, seed)
    ecfg = EvalConfig(model=cfg.model, suites=cfg.suites, n=cfg.n, seed=seed)
    by_suite = build_items(ecfg)
    total = sum(len(v) for v in by_suite.values())
    if rec_file.is_file() and state_file.is_file():
        records = [json.loads(line) for line in rec_file.read_text().splitlines() if line.strip()]
        states = torch.load(state_file)
        if len(records) == total == states.shape[0]:
            if progress:
                progress(total)
            return records, states
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0, stop=["</answer>"],
                            include_stop_str_in_output=True)
    records, prompts = [], []
    for suite in cfg.suites:
        grader = reasoning_gym_suite(suite)
        items = by_suite[suite]
        outs = answer(engine, [it.messages for it in items], params, cfg.concurrency,
                      on_answer=(lambda i, o: progress(1)) if progress else None)
        for it, out in zip(items, outs):
            g = grader.grade(it, extract_answer(out.text), out.text)
            think = out.reasoning.think_tokens if out.reasoning is not None else 0
            records.append({"seed": seed, "suite": suite, "task": getattr(it, "task", None),
                            "correct": bool(g.correct), "think_tokens": think,
                            "output_tokens": len(out.token_ids), "text": out.text})
            prompts.append(engine.encode_prompt(it.messages)[0])
    states = engine.prompt_states(prompts)
    cfg.records_path.mkdir(parents=True, exist_ok=True)
    torch.save(states, state_file)
    rec_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records, states


def examples(records: list[dict], states: torch.Tensor, think_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of the outputs still thinking after ``think_tokens`` tokens: y = 1 for a wrong answer."""
    keep = [i for i, r in enumerate(records) if r["think_tokens"] > think_tokens]
    y = torch.tensor([0 if records[i]["correct"] else 1 for i in keep], dtype=torch.long)
    return states[keep], y


def run_probe(cfg: ProbeConfig, progress: Callable[[int, int], None] | None = None) -> tuple[Path, dict[str, Any]]:
    """Collect (or reuse) the answers, fit, save; returns the probe file and a summary (per-seed counts,
    leave-one-seed-out AUCs)."""
    from llmopt.config import EngineConfig
    from llmopt.engine.engine import LLMEngine

    cfg.validate()
    engine = LLMEngine(cfg.model, EngineConfig(num_threads=cfg.num_threads), quant=cfg.quant, adapter=cfg.adapter)
    per_seed = len(cfg.suites) * cfg.n
    total, done = per_seed * len(cfg.seeds), [0]

    def tick(k: int) -> None:
        done[0] += k
        if progress:
            progress(done[0], total)

    data: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    summary: dict[str, Any] = {"seeds": {}}
    for seed in cfg.seeds:
        records, states = _collect(engine, cfg, seed, tick)
        data[seed] = examples(records, states, cfg.think_tokens)
        x, y = data[seed]
        summary["seeds"][seed] = {"items": len(records), "right": sum(r["correct"] for r in records),
                                  "examples": len(y), "wrong": int(y.sum())}
    loso: dict[int, float] = {}
    if len(cfg.seeds) > 1:
        for held in cfg.seeds:
            rest = [s for s in cfg.seeds if s != held]
            x = torch.cat([data[s][0] for s in rest])
            y = torch.cat([data[s][1] for s in rest])
            if len(set(y.tolist())) < 2 or len(set(data[held][1].tolist())) < 2:
                continue
            loso[held] = round(auc(fit_probe(x, y, cfg.l2).p_wrong(data[held][0]), data[held][1]), 4)
            summary["seeds"][held]["auc_left_out"] = loso[held]
    x = torch.cat([data[s][0] for s in cfg.seeds])
    y = torch.cat([data[s][1] for s in cfg.seeds])
    wrong = int(y.sum())
    if wrong == 0 or wrong == len(y):
        raise ValueError(f"a difficulty probe learns from right and wrong answers still thinking after "
                         f"{cfg.think_tokens} tokens: seeds {list(cfg.seeds)} gave {len(y) - wrong} right and {wrong} "
                         f"wrong; use more items (--n) or seeds, or a model that thinks in <think> (answers kept in "
                         f"{cfg.records_path})")
    meta = dict(cfg.meta, model=cfg.model, quant=cfg.quant, adapter=cfg.adapter, hidden_size=int(x.shape[1]),
                think_tokens=cfg.think_tokens, suites=list(cfg.suites), n=cfg.n, seeds=list(cfg.seeds),
                max_tokens=cfg.max_tokens, wrong=wrong, auc_left_out=loso)  # fit_probe adds l2 and examples
    probe = fit_probe(x, y, cfg.l2, meta=meta)
    summary["auc_train"] = round(auc(probe.p_wrong(x), y), 4)
    probe.meta["auc_train"] = summary["auc_train"]
    summary["auc_left_out"] = loso
    return probe.save(cfg.out), summary
