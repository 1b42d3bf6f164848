"""Supervised fine-tuning with LoRA on our decoder: gold targets and STaR-style distillation.

Targets (``SFTConfig.targets``):

- ``gold``: the task's gold answer in the competition format with a short rationale
  (``Example.target``: the task's own worked solution where it has one);
- ``star``: rejection-sampling distillation. The base model, given a few-shot prompt in the
  format, samples ``samples_per_prompt`` replies per question through llmopt's engine (per-request
  seeds); a reply is kept when it matches the format and the grader accepts its answer. The
  kept replies become targets for the *zero-shot* prompt, so the model learns to answer in the
  format without demos. Samples are saved to ``<out>/star.jsonl`` once (a resume reuses them);
- ``both``: STaR targets where a question had an accepted sample, gold otherwise.

Every example is trained under each system prompt variant in ``systems`` (the competition's,
none, the code suite's for code) in turn. The loss is the mean token cross-entropy of the
target (reply + end-of-turn token) only. fp32, CPU, LoRA on the upper layers (see
``LoraSpec``), AdamW, linear warm-up, then a constant or cosine-decayed learning rate.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmopt.models.adapter import save_adapter
from llmopt.reasoning.format import format_ok, parse_output
from llmopt.train.common import (
    LoraSpec,
    RunLog,
    TrainConfigError,
    apply_lora,
    check_resume_config,
    export_adapter,
    latest_checkpoint,
    load_lora_weights,
    lora_parameters,
    require,
    restore_rng,
    save_checkpoint,
    token_logprobs,
    write_config,
)
from llmopt.train.data import SYSTEM_VARIANTS, Example, build_examples, load_jsonl_examples, parse_suites

log = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    model: str = "smollm2-135m-instruct"
    out: str = "runs/sft"
    suites: str = "math=60,logic=60,code=30"  # suite=count of training questions
    data: str | None = None  # a JSONL file of your own questions instead of the generators
    init_adapter: str | None = None  # start from this adapter (same base model and LoRA layout)
    chunk: int = 0  # which block of training seeds (llmopt.train.data)
    targets: str = "gold"  # gold | star | both
    systems: str = "reasoning,none"  # system prompt variants, taken in turn per example
    epochs: int = 1
    lr: float = 3e-4
    warmup_steps: int = 3
    lr_schedule: str = "constant"  # constant | cosine (decays to lr_min_ratio * lr at the last step)
    lr_min_ratio: float = 0.1
    grad_accum: int = 4  # sequences per optimizer step
    max_seq_tokens: int = 384  # examples longer than this (prompt + target) are skipped
    save_every: int = 10  # optimizer steps between checkpoints
    seed: int = 0
    lora: LoraSpec = field(default_factory=LoraSpec)
    # STaR sampling
    samples_per_prompt: int = 4
    sample_temperature: float = 0.8
    sample_max_tokens: int = 160
    shots: int = 2
    num_threads: int | None = None

    def validate(self) -> None:
        require(self.targets in ("gold", "star", "both"), f"targets must be gold, star or both, got {self.targets!r}")
        require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        require(0 < self.lr < 1, f"learning rate must be in (0, 1), got {self.lr}")
        require(self.warmup_steps >= 0, f"warmup steps must be >= 0, got {self.warmup_steps}")
        require(self.lr_schedule in ("constant", "cosine"),
                f"lr schedule must be constant or cosine, got {self.lr_schedule!r}")
        require(0 <= self.lr_min_ratio <= 1, f"lr min ratio must be in [0, 1], got {self.lr_min_ratio}")
        require(self.grad_accum >= 1, f"grad accumulation must be >= 1, got {self.grad_accum}")
        require(self.max_seq_tokens >= 32, f"max sequence tokens must be >= 32, got {self.max_seq_tokens}")
        require(self.save_every >= 1, f"save-every must be >= 1, got {self.save_every}")
        require(self.samples_per_prompt >= 1, f"samples per prompt must be >= 1, got {self.samples_per_prompt}")
        require(0 < self.sample_temperature <= 2, f"sample temperature must be in (0, 2], got {self.sample_temperature}")
        require(self.sample_max_tokens >= 8, f"sample max tokens must be >= 8, got {self.sample_max_tokens}")
        require(self.shots >= 0, f"shots must be >= 0, got {self.shots}")
        bad = [s for s in self.system_list if s not in SYSTEM_VARIANTS]
        require(not bad and bool(self.system_list),
                f"systems must be a comma list of {', '.join(SYSTEM_VARIANTS)}, got {self.systems!r}")
        parse_suites(self.suites)

    @property
    def system_list(self) -> list[str]:
        return [s.strip() for s in self.systems.split(",") if s.strip()]


def lr_at_step(cfg: SFTConfig, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up over ``warmup_steps``,
    then constant, or cosine from ``lr`` down to ``lr_min_ratio * lr`` at the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - 1 - cfg.warmup_steps)
    frac = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    return cfg.lr * (cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass
class SFTSample:
    prompt_ids: list[int]
    target_ids: list[int]
    id: str
    source: str  # gold | star


def few_shot_messages(ex: Example, demos: list[Example]) -> list[dict[str, str]]:
    """The competition system prompt, ``demos`` as solved turns in the format, then the question."""
    msgs = ex.messages("code" if ex.suite == "code" else "reasoning")
    head, question = msgs[:-1], msgs[-1]
    for d in demos:
        head += [{"role": "user", "content": d.question}, {"role": "assistant", "content": d.target()}]
    return head + [question]


def collect_star(engine, examples: list[Example], cfg: SFTConfig,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, list[str]]:
    """Sample replies from ``engine`` with a few-shot format prompt and keep the ones the
    verifier accepts: ``{example id: [accepted reply, ...]}``."""
    from llmopt.engine.sampling_params import SamplingParams

    prompts, params, owners = [], [], []
    for i, ex in enumerate(examples):
        pool = [e for e in examples if e.suite == ex.suite and e.task != ex.task] or [e for e in examples if e is not ex]
        demos = random.Random(cfg.seed * 7919 + i).sample(pool, min(cfg.shots, len(pool)))
        msgs = few_shot_messages(ex, demos)
        for k in range(cfg.samples_per_prompt):
            prompts.append(msgs)
            params.append(SamplingParams(max_tokens=cfg.sample_max_tokens, temperature=cfg.sample_temperature,
                                         top_p=0.95, seed=cfg.seed * 1_000_003 + i * 101 + k))
            owners.append(ex)
    outs = engine.generate(prompts, params, on_progress=progress)
    kept: dict[str, list[str]] = {}
    for ex, out in zip(owners, outs):
        text = out.text
        if format_ok(text) and ex.grade(parse_output(text).answer.strip()).correct:
            if text not in kept.get(ex.id, []):
                kept.setdefault(ex.id, []).append(text)
    return kept


def build_samples(tokenizer, examples: list[Example], cfg: SFTConfig, star: dict[str, list[str]] | None,
                  eos_id: int) -> list[SFTSample]:
    systems = cfg.system_list
    out: list[SFTSample] = []
    skipped = 0
    for i, ex in enumerate(examples):
        variants = systems if ex.suite == "code" or "code" not in systems else [s for s in systems if s != "code"]
        system = variants[i % len(variants)]
        targets: list[tuple[str, str]] = []
        if cfg.targets in ("star", "both") and star and star.get(ex.id):
            targets += [(t, "star") for t in star[ex.id]]
        if cfg.targets == "gold" or (cfg.targets == "both" and not targets):
            targets.append((ex.target(), "gold"))
        for text, src in targets:
            p = tokenizer.apply_chat_template(ex.messages(system))
            t = tokenizer.encode(text, add_special_tokens=False) + [eos_id]
            if len(p) + len(t) > cfg.max_seq_tokens:
                skipped += 1
                continue
            out.append(SFTSample(p, t, ex.id, src))
    if skipped:
        log.info("skipped %d examples longer than %d tokens", skipped, cfg.max_seq_tokens)
    return out


def sft_loss(model, sample: SFTSample) -> torch.Tensor:
    ids = sample.prompt_ids + sample.target_ids
    return -token_logprobs(model, ids, len(sample.prompt_ids)).mean()


def run_sft(cfg: SFTConfig, progress: Callable[[dict], None] | None = None) -> Path:
    """Train; returns the path of the final adapter (``<out>/adapter.safetensors``).

    Resumes from the newest complete checkpoint in ``cfg.out``. On KeyboardInterrupt it saves
    a checkpoint at the last finished optimizer step and re-raises.
    """
    from llmopt.models.loader import load_model

    cfg.validate()
    run_dir = Path(cfg.out)
    check_resume_config(run_dir, cfg, ["model", "data", "init_adapter", "suites", "chunk", "targets", "systems", "grad_accum", "lora", "seed"])
    torch.manual_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.data:
        examples = load_jsonl_examples(cfg.data)
    else:
        examples = build_examples(parse_suites(cfg.suites), cfg.chunk, cfg.seed)

    star = None
    if cfg.targets in ("star", "both"):
        star = _star_samples(cfg, run_dir, examples)

    loaded = load_model(cfg.model)
    eos_id = loaded.config.eos_token_ids[0]
    samples = build_samples(loaded.tokenizer, examples, cfg, star, eos_id)
    if not samples:
        raise TrainConfigError("no training samples: every example was longer than --max-seq-tokens or no STaR sample "
                               "was accepted; raise --max-seq-tokens, add examples or use --targets gold")
    write_config(run_dir, cfg)
    peft_model = apply_lora(loaded.model, cfg.lora, cfg.seed)
    if cfg.init_adapter:
        from llmopt.models.adapter import load_adapter

        load_lora_weights(peft_model, load_adapter(cfg.init_adapter), f"adapter {cfg.init_adapter}")
    model = loaded.model  # the same modules, now with LoRA layers inside
    model.train()
    params = lora_parameters(peft_model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(samples) / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    order = [j for e in range(cfg.epochs) for j in random.Random(cfg.seed + e).sample(range(len(samples)), len(samples))]

    runlog = RunLog(run_dir / "log.jsonl")
    step = 0
    resumed = latest_checkpoint(run_dir)
    if resumed is not None:
        adapter, state = resumed
        load_lora_weights(peft_model, adapter, f"checkpoint in {run_dir}")
        opt.load_state_dict(state["optimizer"])
        restore_rng(state)
        step = int(state["step"])
        runlog.truncate_after(step)
        log.info("resumed %s at step %d of %d", run_dir, step, total_steps)

    def lr_at(s: int) -> float:
        return lr_at_step(cfg, s, total_steps)

    def checkpoint(s: int) -> None:
        save_checkpoint(run_dir, s, export_adapter(peft_model, cfg.model), {"optimizer": opt.state_dict()})

    try:
        while step < total_steps:
            t0 = time.perf_counter()
            batch = [samples[j] for j in order[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss_sum, ntok = 0.0, 0
            for s in batch:
                loss = sft_loss(model, s)
                (loss / len(batch)).backward()
                loss_sum += loss.item()
                ntok += len(s.prompt_ids) + len(s.target_ids)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            dt = time.perf_counter() - t0
            rec = {"step": step, "total_steps": total_steps, "loss": loss_sum / len(batch), "lr": lr_at(step - 1),
                   "tokens_per_s": ntok / dt, "step_s": dt, "sources": [s.source for s in batch],
                   "time": time.time()}
            runlog.write(rec)
            if progress:
                progress(rec)
            if step % cfg.save_every == 0 or step == total_steps:
                checkpoint(step)
    except KeyboardInterrupt:
        opt.zero_grad(set_to_none=True)
        done = latest_checkpoint(run_dir)
        if step > 0 and (done is None or int(done[1]["step"]) < step):
            checkpoint(step)
        log.warning("interrupted at step %d: %s; run the same command to resume", step,
                    "saved" if step else "nothing to save yet")
        raise
    final = run_dir / "adapter.safetensors"
    recipe = json.dumps({"kind": "sft", "targets": cfg.targets, "suites": cfg.suites, "chunk": cfg.chunk,
                         "epochs": cfg.epochs, "lr": cfg.lr, "rank": cfg.lora.rank,
                         "first_layer": cfg.lora.first_layer, "seed": cfg.seed})
    save_adapter(final, export_adapter(peft_model, cfg.model, recipe))
    return final


def _star_samples(cfg: SFTConfig, run_dir: Path, examples: list[Example]) -> dict[str, list[str]]:
    path = run_dir / "star.jsonl"
    if path.exists():
        return {r["id"]: r["replies"] for r in map(json.loads, path.read_text().splitlines()) if r}
    from llmopt.config import EngineConfig
    from llmopt.engine.engine import LLMEngine

    engine = LLMEngine(cfg.model, EngineConfig(num_threads=cfg.num_threads, kv_cache_memory_gb=1.0,
                                               max_num_seqs=32))
    kept = collect_star(engine, examples, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps({"id": k, "replies": v}) + "\n" for k, v in kept.items()))
    tmp.replace(path)
    log.info("STaR: %d of %d questions have an accepted sample", len(kept), len(examples))
    return kept
