"""GRPO on llmopt's own engine: group rollouts, grader rewards, clipped ratio, KL to the reference.

One step:

1. take ``prompts_per_step`` training questions; for each, ``group_size`` rollouts are sampled
   by :class:`~llmopt.engine.engine.LLMEngine` in one batch, each request with its own seed and
   ``logprobs=0`` (the chosen token's log-probability comes back from the same forward pass
   that sampled it). The prefix cache is emptied first (its blocks hold K/V of the previous
   policy); the first group's leader is prefilled alone, then the other leaders (reusing the
   shared system-prompt blocks), then the other members, reusing their leader's prompt blocks
   through the prefix cache (``cached_prompt_tokens`` in the log);
2. rewards (:mod:`llmopt.train.rewards`): format + correctness from the evaluation graders,
   optional length term; advantages are group-normalized, ``(r - mean) / (std + 1e-4)``;
3. the policy loss per token is PPO's clipped surrogate
   ``-min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)`` with ``ratio = exp(logp - logp_old)``,
   plus ``beta * KL`` to the reference policy with the k3 estimator
   ``exp(ref - logp) - (ref - logp) - 1``; averaged over each rollout's tokens, then over
   rollouts. ``updates_per_step`` optimizer steps reuse the same rollouts (the ratio moves away
   from 1 after the first);
4. the policy is the engine's own decoder module with PEFT LoRA layers inside it. For the
   rollouts every projection is swapped for a pre-packed fp32 copy (:class:`RolloutWeights`; a
   LoRA projection packed from its merged weight ``W + scale * B @ A``), so the engine runs its
   native fp32 GEMM on the current policy, then the LoRA modules are put back for the update.

The reference policy is the starting policy, as in TRL: with ``--init-adapter`` (an SFT adapter)
that adapter is merged into the base weights first and a fresh LoRA is trained on top, so the
LoRA-disabled model *is* the SFT policy; the KL term keeps GRPO near it rather than pulling it
back to the untrained base. The adapter written at the end stacks the two (ranks concatenated,
:func:`~llmopt.models.adapter.stack_adapters`) and loads on the plain base model; checkpoints
hold the GRPO LoRA alone (on top of the merged init adapter), which is what a resumed run needs.

Log-probabilities are those of the untempered distribution on both sides (the engine reports
``log_softmax(logits)``); ``temperature`` only changes which tokens get sampled.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmopt.models.adapter import base_fingerprint, load_adapter, merge_adapter, save_adapter, stack_adapters
from llmopt.train.common import (
    LoraSpec,
    RunLog,
    TrainConfigError,
    apply_lora,
    check_resume_config,
    export_adapter,
    latest_checkpoint,
    load_lora_weights,
    lora_delta,
    lora_layers,
    lora_parameters,
    require,
    restore_rng,
    save_checkpoint,
    token_logprobs,
    write_config,
)
from llmopt.train.data import SYSTEM_VARIANTS, Example, build_examples, parse_suites
from llmopt.train.rewards import Reward, RewardConfig, reward

log = logging.getLogger(__name__)


@dataclass
class GRPOConfig:
    model: str = "smollm2-135m-instruct"
    out: str = "runs/grpo"
    init_adapter: str | None = None  # start from an SFT adapter (same base model, same LoRA layout)
    suites: str = "math=40,logic=40,code=20"
    chunk: int = 1  # training seed block; SFT's default is 0, so GRPO sees other questions
    systems: str = "reasoning,none"
    steps: int = 10
    prompts_per_step: int = 2
    group_size: int = 4
    max_new_tokens: int = 96
    temperature: float = 1.0
    lr: float = 1e-4
    clip_eps: float = 0.2
    beta: float = 0.04  # KL weight (0 disables the reference pass)
    updates_per_step: int = 1
    save_every: int = 5
    seed: int = 0
    max_prompt_tokens: int = 320
    lora: LoraSpec = field(default_factory=LoraSpec)
    reward: RewardConfig = field(default_factory=RewardConfig)
    num_threads: int | None = None

    def validate(self) -> None:
        require(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        require(self.prompts_per_step >= 1, f"prompts per step must be >= 1, got {self.prompts_per_step}")
        require(self.group_size >= 2, f"group size must be >= 2 (advantages are relative to the group), got {self.group_size}")
        require(self.max_new_tokens >= 8, f"max new tokens must be >= 8, got {self.max_new_tokens}")
        require(0 < self.temperature <= 2, f"temperature must be in (0, 2], got {self.temperature}")
        require(0 < self.lr < 1, f"learning rate must be in (0, 1), got {self.lr}")
        require(0 < self.clip_eps < 1, f"clip epsilon must be in (0, 1), got {self.clip_eps}")
        require(self.beta >= 0, f"KL weight beta must be >= 0, got {self.beta}")
        require(self.updates_per_step >= 1, f"updates per step must be >= 1, got {self.updates_per_step}")
        require(self.save_every >= 1, f"save-every must be >= 1, got {self.save_every}")
        require(self.max_prompt_tokens >= 16, f"max prompt tokens must be >= 16, got {self.max_prompt_tokens}")
        systems = [s.strip() for s in self.systems.split(",") if s.strip()]
        require(bool(systems) and all(s in SYSTEM_VARIANTS for s in systems),
                f"systems must be a comma list of {', '.join(SYSTEM_VARIANTS)}, got {self.systems!r}")
        self.reward.validate()
        parse_suites(self.suites)


@dataclass
class Rollout:
    example: Example
    prompt_ids: list[int]
    token_ids: list[int]
    old_logprobs: list[float]
    text: str
    reward: float
    format_ok: bool
    correct: bool
    advantage: float = 0.0


def group_advantages(rewards: list[float]) -> list[float]:
    """``(r - mean) / (std + 1e-4)`` over one group (population std): all-equal rewards give 0."""
    m = statistics.fmean(rewards)
    sd = statistics.pstdev(rewards)
    return [(r - m) / (sd + 1e-4) for r in rewards]


def grpo_loss(new_lp: torch.Tensor, old_lp: torch.Tensor, ref_lp: torch.Tensor | None, advantage: float,
              clip_eps: float, beta: float) -> tuple[torch.Tensor, float, float]:
    """Per-rollout loss (mean over its tokens), its mean KL and clipped fraction."""
    ratio = torch.exp(new_lp - old_lp)
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantage
    per_tok = -torch.minimum(unclipped, clipped)
    kl = torch.zeros(())
    if ref_lp is not None:
        d = ref_lp - new_lp
        kl = torch.exp(d) - d - 1
        per_tok = per_tok + beta * kl
    frac = ((ratio - 1).abs() > clip_eps).float().mean().item()
    return per_tok.mean(), float(kl.mean().item()) if ref_lp is not None else 0.0, frac


class GRPOTrainer:
    """``reward_fn(text, example, num_tokens) -> Reward`` replaces the grader reward (custom tasks)."""

    def __init__(self, cfg: GRPOConfig, reward_fn: Callable[[str, Example, int], Reward] | None = None):
        from llmopt.config import EngineConfig
        from llmopt.engine.engine import LLMEngine

        cfg.validate()
        self.cfg = cfg
        self.reward_fn = reward_fn or (
            lambda text, ex, n: reward(text, ex.grade, n, cfg.max_new_tokens, cfg.reward))
        self.run_dir = Path(cfg.out)
        check_resume_config(self.run_dir, cfg, ["model", "suites", "chunk", "systems", "group_size",
                                                "prompts_per_step", "lora", "seed", "init_adapter"])
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.examples = build_examples(parse_suites(cfg.suites), cfg.chunk, cfg.seed)
        n = cfg.prompts_per_step * cfg.group_size
        # packed_linear=False and quant="fp32": the policy's float nn.Linear modules (LoRA-wrapped)
        # are what the engine runs; a GGUF base is dequantized, not run on its blocks, so that LoRA
        # can wrap its projections and the adapter is trained on the weights it is merged into
        self.engine = LLMEngine(cfg.model, EngineConfig(num_threads=cfg.num_threads, packed_linear=False,
                                                        enable_prefix_caching=True, max_num_seqs=max(n, 1),
                                                        kv_cache_memory_gb=0.5), quant="fp32")
        self.tokenizer = self.engine.tokenizer
        self.model = self.engine.model
        self.base_fingerprint = base_fingerprint(self.model)
        self.init_adapter = None
        if cfg.init_adapter:
            # the reference policy is the starting policy: merge the init adapter into the base weights
            self.init_adapter = load_adapter(cfg.init_adapter)
            merge_adapter(self.model, self.init_adapter, f"--init-adapter {cfg.init_adapter}")
        self.peft_model = apply_lora(self.model, cfg.lora, cfg.seed)
        self.model.eval()  # no dropout anywhere; gradients still flow to LoRA
        self.params = lora_parameters(self.peft_model)
        self.rollout_weights = RolloutWeights(self.model, self.peft_model, self.engine.runner)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        self.systems = [s.strip() for s in cfg.systems.split(",") if s.strip()]
        self.runlog = RunLog(self.run_dir / "log.jsonl")
        self.step = 0
        resumed = latest_checkpoint(self.run_dir)
        if resumed is not None:
            adapter, state = resumed
            load_lora_weights(self.peft_model, adapter, f"checkpoint in {self.run_dir}")
            self.opt.load_state_dict(state["optimizer"])
            for g in self.opt.param_groups:  # the saved state carries the old run's lr: this command's --lr wins
                g["lr"] = cfg.lr
            restore_rng(state)
            self.step = int(state["step"])
            self.runlog.truncate_after(self.step)
            log.info("resumed %s at step %d", self.run_dir, self.step)
        write_config(self.run_dir, cfg)

    # ---- rollouts -------------------------------------------------------------------------------
    def _prompts_for(self, step: int) -> list[tuple[Example, list[int]]]:
        out = []
        k = step * self.cfg.prompts_per_step
        tries = 0
        while len(out) < self.cfg.prompts_per_step:
            ex = self.examples[k % len(self.examples)]
            system = self.systems[k % len(self.systems)] if ex.suite != "code" or "code" not in self.systems else "code"
            if system == "code" and ex.suite != "code":
                system = "reasoning"
            ids = self.tokenizer.apply_chat_template(ex.messages(system))
            k += 1
            tries += 1
            if len(ids) <= self.cfg.max_prompt_tokens:
                out.append((ex, ids))
            if tries > len(self.examples):
                raise TrainConfigError(f"no training prompt fits --max-prompt-tokens {self.cfg.max_prompt_tokens}")
        return out

    def rollouts(self, step: int) -> tuple[list[list[Rollout]], dict[str, float]]:
        from llmopt.engine.sampling_params import SamplingParams

        cfg = self.cfg
        t0 = time.perf_counter()
        groups_in = self._prompts_for(step)
        seqs: list[list] = []
        eng = self.engine
        with eng.lock:
            for p, (ex, ids) in enumerate(groups_in):
                seqs.append([])
                for g in range(cfg.group_size):
                    sp = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0,
                                        seed=(cfg.seed * 1_000_003 + step * 10_007 + p * cfg.group_size + g) & 0x7FFFFFFF,
                                        logprobs=0)
                    seqs[-1].append((ex, ids, sp))
        with self.rollout_weights.policy():
            # the cached blocks hold K/V of the policy before the last update: compute them anew
            eng.reset_prefix_cache()
            # the first leader alone (its prompt's system part is every prompt's start), then the
            # other leaders, reusing those blocks; then the followers, hitting their leader's blocks
            live = [[eng.add_request(*seqs[0][0][1:])]]
            eng.step()
            live += [[eng.add_request(ids, sp)] for ex, ids, sp in (grp[0] for grp in seqs[1:])]
            if len(seqs) > 1:
                eng.step()
            for grp, handles in zip(seqs, live):
                for _ex, ids, sp in grp[1:]:
                    handles.append(eng.add_request(ids, sp))
            while eng.has_unfinished():
                eng.step()
        gen_s = time.perf_counter() - t0
        groups: list[list[Rollout]] = []
        new_tokens = cached = 0
        from llmopt.engine.sequence import RequestOutput

        for grp, handles in zip(seqs, live):
            rs = []
            for (ex, ids, _sp), seq in zip(grp, handles):
                out = RequestOutput.of(seq)
                r = self.reward_fn(out.text, ex, len(out.token_ids))
                rs.append(Rollout(ex, list(ids), list(out.token_ids), [lp.logprob for lp in out.logprobs or []],
                                  out.text, r.total, r.format_ok, r.correct))
                new_tokens += len(out.token_ids)
                cached += out.num_cached_tokens
            for ro, a in zip(rs, group_advantages([x.reward for x in rs])):
                ro.advantage = a
            groups.append(rs)
        return groups, {"rollout_s": gen_s, "rollout_tokens": new_tokens, "rollout_tokens_per_s": new_tokens / gen_s,
                        "cached_prompt_tokens": cached, "rollout_pack_s": self.rollout_weights.pack_s,
                        "rollout_fused": float(self.rollout_weights.fused)}

    # ---- update ----------------------------------------------------------------------------------
    def update(self, groups: list[list[Rollout]]) -> dict[str, float]:
        cfg = self.cfg
        flat = [r for g in groups for r in g if r.token_ids and abs(r.advantage) > 1e-6]
        t0 = time.perf_counter()
        kls, fracs, losses = [], [], []
        ref_cache: dict[int, torch.Tensor] = {}
        tokens = 0
        for _ in range(cfg.updates_per_step):
            self.opt.zero_grad(set_to_none=True)
            for i, r in enumerate(flat):
                ids = r.prompt_ids + r.token_ids
                start = len(r.prompt_ids)
                old = torch.tensor(r.old_logprobs[: len(r.token_ids)], dtype=torch.float32)
                ref = None
                if cfg.beta > 0:
                    if i not in ref_cache:
                        with torch.no_grad(), self.peft_model.disable_adapter():
                            ref_cache[i] = token_logprobs(self.model, ids, start)
                    ref = ref_cache[i]
                new = token_logprobs(self.model, ids, start)
                loss, kl, frac = grpo_loss(new, old, ref, r.advantage, cfg.clip_eps, cfg.beta)
                (loss / len(flat)).backward()
                losses.append(loss.item())
                kls.append(kl)
                fracs.append(frac)
                tokens += len(ids)
            if flat:
                torch.nn.utils.clip_grad_norm_(self.params, 1.0)
                self.opt.step()
        dt = time.perf_counter() - t0
        return {"loss": statistics.fmean(losses) if losses else 0.0, "kl": statistics.fmean(kls) if kls else 0.0,
                "clip_frac": statistics.fmean(fracs) if fracs else 0.0, "update_s": dt,
                "trained_rollouts": len(flat), "update_tokens_per_s": tokens / dt if dt > 0 else 0.0}

    def checkpoint(self) -> None:
        save_checkpoint(self.run_dir, self.step, export_adapter(self.peft_model, self.cfg.model),
                        {"optimizer": self.opt.state_dict()})

    def train(self, progress: Callable[[dict], None] | None = None) -> Path:
        cfg = self.cfg
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                groups, gen = self.rollouts(self.step)
                upd = self.update(groups)
                self.step += 1
                flat = [r for g in groups for r in g]
                rec = {"step": self.step, "total_steps": cfg.steps,
                       "reward": statistics.fmean(r.reward for r in flat),
                       "format_rate": statistics.fmean(float(r.format_ok) for r in flat),
                       "accuracy": statistics.fmean(float(r.correct) for r in flat),
                       "mean_completion_tokens": statistics.fmean(len(r.token_ids) for r in flat),
                       **gen, **upd, "step_s": time.perf_counter() - t0, "time": time.time(),
                       "sample": flat[0].text[:200]}
                self.runlog.write(rec)
                if progress:
                    progress(rec)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.checkpoint()
        except KeyboardInterrupt:
            done = latest_checkpoint(self.run_dir)
            if self.step > 0 and (done is None or int(done[1]["step"]) < self.step):
                self.checkpoint()
            log.warning("interrupted at step %d: %s; run the same command to resume", self.step,
                        "saved" if self.step else "nothing to save yet")
            raise
        final = self.run_dir / "adapter.safetensors"
        recipe = json.dumps({"kind": "grpo", "init_adapter": cfg.init_adapter, "suites": cfg.suites, "chunk": cfg.chunk,
                             "steps": cfg.steps, "group_size": cfg.group_size, "lr": cfg.lr, "beta": cfg.beta,
                             "seed": cfg.seed})
        trained = export_adapter(self.peft_model, cfg.model, recipe)
        if self.init_adapter is not None:
            trained = stack_adapters([self.init_adapter, trained], self.base_fingerprint, cfg.model, recipe)
        save_adapter(final, trained)
        return final


@contextmanager
def merged_lora(peft_model: torch.nn.Module) -> Iterator[None]:
    """Inside: every LoRA layer's base weight holds ``W + scale * B @ A`` and the LoRA branch is off,
    so a forward pass runs plain Linear layers with the policy's weights; on exit ``W`` is restored
    bit for bit (a saved copy, not a subtraction)."""
    layers = list(lora_layers(peft_model).values())
    saved = []
    with torch.no_grad():
        for m in layers:
            w = m.get_base_layer().weight
            saved.append(w.detach().clone())
            w.add_(lora_delta(m).to(w.dtype))
    try:
        with peft_model.disable_adapter():  # type: ignore[operator]
            yield
    finally:
        with torch.no_grad():
            for m, w0 in zip(layers, saved):
                m.get_base_layer().weight.copy_(w0)


class RolloutWeights:
    """The policy as the engine runs it for rollouts: every projection swapped for a
    :class:`~llmopt.kernels.dense.PackedLinear` (the native pre-packed fp32 GEMM, 1.4-2.7x torch's at
    the 8-32 rows of a rollout's decode steps, see benchmarks/bench_sgemm.py), the original modules put back
    on exit.

    A LoRA projection is packed from ``W + scale * B @ A`` on every entry (the adapter changes each
    step), by one batched GEMM into a packed copy of its frozen ``W`` made on the first entry
    (:func:`~llmopt.kernels.dense.pack_add_lowrank`); a frozen projection without LoRA
    (``requires_grad`` off) is packed once and kept (one extra fp32 copy of all those weights,
    ~540 MB for SmolLM2-135M with LoRA on layers 18..29). The
    forward pass then computes what the LoRA model computes, up to float rounding (tests check the
    rollout log-probs against the LoRA forward). Without the native kernel, :func:`merged_lora`
    (plain Linear layers, merged weights) does the same job.

    ``runner``: the engine's :class:`~llmopt.engine.runner.ModelRunner`. Inside ``policy()`` its fused
    decode step is rebuilt on the packed projections, so a rollout's decode steps run the whole
    decoder stack in one native call (the same packed GEMM, bit for bit the op-by-op forward); on
    exit it is rebuilt on the modules put back (none for LoRA layers: op by op)."""

    def __init__(self, model: torch.nn.Module, peft_model: torch.nn.Module, runner=None):
        self.model = model
        self.peft_model = peft_model
        self.runner = runner
        self.fused = False  # the last entry's decode steps ran fused
        self.frozen: dict[str, torch.nn.Module] = {}  # name -> packed copy of a projection without LoRA
        self.base_packed: dict[str, torch.Tensor] = {}  # name -> packed frozen base weight of a LoRA projection
        self.pack_s = 0.0  # the last entry's set-up: packing, swapping, rebuilding the fused step

    def _targets(self) -> list[tuple[str, torch.nn.Module]] | None:
        """(name, module) of every projection to swap, or None when one cannot be packed."""
        from peft.tuners.lora import LoraLayer

        from llmopt.kernels.dense import native_available

        names = getattr(self.model, "projection_names", None)
        if names is None or not native_available():
            return None
        out = []
        for name in names():
            mod = self.model.get_submodule(name)
            base = mod.get_base_layer() if isinstance(mod, LoraLayer) else mod
            if type(base) is not torch.nn.Linear or base.weight.dtype != torch.float32 or base.weight.device.type != "cpu":
                return None
            if isinstance(mod, LoraLayer) and list(mod.lora_A) != ["default"]:
                return None
            out.append((name, mod))
        return out

    @contextmanager
    def policy(self) -> Iterator[None]:
        from peft.tuners.lora import LoraLayer

        from llmopt.kernels.dense import PackedLinear, pack_add_lowrank, pack_weight

        self.fused = False
        targets = self._targets()
        if targets is None:
            with merged_lora(self.peft_model):
                yield
            return
        t0 = time.perf_counter()
        swapped = []
        with torch.no_grad():
            for name, mod in targets:
                if isinstance(mod, LoraLayer):
                    base = mod.get_base_layer()
                    if base.weight.requires_grad:  # a trained base: merge it as it is now
                        packed = PackedLinear(base.weight + lora_delta(mod).to(base.weight.dtype), base.bias)
                    else:
                        if name not in self.base_packed:
                            self.base_packed[name] = pack_weight(base.weight)
                        packed = PackedLinear.from_packed(
                            pack_add_lowrank(self.base_packed[name], mod.lora_B["default"].weight,
                                             mod.lora_A["default"].weight, float(mod.scaling["default"])),
                            base.out_features, base.bias)
                elif mod.weight.requires_grad:  # trained in place: its packed copy would go stale
                    packed = PackedLinear.from_linear(mod)  # type: ignore[arg-type]
                else:
                    if name not in self.frozen:
                        self.frozen[name] = PackedLinear.from_linear(mod)  # type: ignore[arg-type]
                    packed = self.frozen[name]
                swapped.append((name, mod, packed))
        try:
            for name, _mod, packed in swapped:
                self.model.set_submodule(name, packed)
            if self.runner is not None:
                self.fused = self.runner.rebuild_fused() is not None
            self.pack_s = time.perf_counter() - t0
            yield
        finally:
            for name, mod, _packed in swapped:
                self.model.set_submodule(name, mod)
            if self.runner is not None:
                self.runner.rebuild_fused()


def run_grpo(cfg: GRPOConfig, progress: Callable[[dict], None] | None = None) -> Path:
    return GRPOTrainer(cfg).train(progress)


__all__ = ["GRPOConfig", "GRPOTrainer", "Rollout", "RolloutWeights", "group_advantages", "grpo_loss", "merged_lora", "run_grpo"]
