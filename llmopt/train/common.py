"""What SFT and GRPO share: LoRA on our decoder (PEFT), token-level log-probs, checkpoints that
are complete or absent, the JSONL run log.

Checkpoints: ``<run_dir>/checkpoints/step-000050/`` holds ``adapter.safetensors`` (fp32 LoRA
weights in the shipped adapter format), ``state.pt`` (optimizer, step, RNG states, data cursor)
and ``COMPLETE``. It is written into ``step-000050.tmp-<pid>`` and renamed when every file is
there, so a kill mid-write leaves a ``.tmp`` directory that is never loaded. Resuming takes the
newest complete checkpoint and drops run-log lines written after it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmopt.models.adapter import LoraAdapter, base_fingerprint, load_adapter, save_adapter

log = logging.getLogger(__name__)

LORA_MODULES: tuple[str, ...] = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class TrainConfigError(ValueError):
    """A hyper-parameter or path that cannot work; the message says what to change."""


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise TrainConfigError(msg)


@dataclass
class LoraSpec:
    rank: int = 16
    alpha: float = 32.0
    first_layer: int = 18  # LoRA on layers [first_layer, num_layers): backward stops there (CPU budget)

    def validate(self, num_layers: int) -> None:
        require(1 <= self.rank <= 256, f"lora rank must be in [1, 256], got {self.rank}")
        require(self.alpha > 0, f"lora alpha must be > 0, got {self.alpha}")
        require(0 <= self.first_layer < num_layers,
                f"lora first layer must be in [0, {num_layers - 1}] for this {num_layers}-layer model, "
                f"got {self.first_layer}")


def apply_lora(model: nn.Module, spec: LoraSpec, seed: int = 0) -> nn.Module:
    """Wrap the projections of layers >= ``spec.first_layer`` with PEFT LoRA (in place: the
    modules of ``model`` itself become LoRA layers), freeze everything else; returns the PEFT model."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:  # pragma: no cover - depends on the environment
        raise TrainConfigError("training needs PEFT: pip install 'llmopt[train]'") from None
    n = model.cfg.num_layers
    spec.validate(n)
    layers = "|".join(str(i) for i in range(spec.first_layer, n))
    pattern = rf"layers\.({layers})\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))"
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=pattern, lora_dropout=0.0, bias="none")
    return get_peft_model(model, cfg)


def lora_parameters(peft_model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in peft_model.named_parameters() if p.requires_grad]


def lora_layers(peft_model: nn.Module) -> dict[str, Any]:
    """PEFT's LoRA layers of ``peft_model`` (those with the ``default`` adapter) by their module name
    in the plain ``Transformer``."""
    from peft.tuners.lora import LoraLayer

    return {name.replace("base_model.model.", ""): m for name, m in peft_model.named_modules()
            if isinstance(m, LoraLayer) and "default" in m.lora_A}


def lora_delta(layer: Any) -> torch.Tensor:
    """``scale * B @ A`` of one PEFT LoRA layer: what it adds to its base weight."""
    return (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]


def export_adapter(peft_model: nn.Module, base_name: str, recipe: str = "") -> LoraAdapter:
    """Our adapter format from a PEFT model (module names of the plain ``Transformer``)."""
    tensors = {}
    scale = None
    for name, mod in lora_layers(peft_model).items():
        a = mod.lora_A["default"].weight.detach().clone()
        b = mod.lora_B["default"].weight.detach().clone()
        tensors[name] = (a, b)
        scale = mod.scaling["default"]
    require(bool(tensors), "the model has no LoRA layers to export")
    return LoraAdapter(tensors, float(scale), base_fingerprint(peft_model), base_name, recipe)


def load_lora_weights(peft_model: nn.Module, adapter: LoraAdapter, source: str) -> None:
    """Put an adapter's A/B into the PEFT model's LoRA layers (to resume a run, or SFT from --init-adapter)."""
    from llmopt.models.adapter import AdapterMismatchError

    fp = base_fingerprint(peft_model)
    if adapter.base_fingerprint != fp:
        raise AdapterMismatchError(
            f"{source} was trained on base model {adapter.base_name or '?'} (fingerprint {adapter.base_fingerprint}), "
            f"not on the loaded model (fingerprint {fp}): start from an adapter of this base model")
    mods = lora_layers(peft_model)
    if set(mods) != set(adapter.tensors):
        raise TrainConfigError(f"{source} adapts {len(adapter.tensors)} modules but this run's LoRA has {len(mods)} "
                               "(different --lora-first-layer?): use the same LoRA layout")
    with torch.no_grad():
        for name, (a, b) in adapter.tensors.items():
            m = mods[name]
            if tuple(m.lora_A["default"].weight.shape) != tuple(a.shape):
                raise TrainConfigError(f"{source}: {name} has rank {a.shape[0]}, this run uses "
                                       f"{m.lora_A['default'].weight.shape[0]}: use the same --lora-rank")
            m.lora_A["default"].weight.copy_(a.float())
            m.lora_B["default"].weight.copy_(b.float())


def token_logprobs(model: nn.Module, ids: list[int], start: int, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of ``ids[start:]`` each given the tokens before it, one causal pass of
    our decoder (``model`` is the plain ``Transformer`` or its PEFT wrapper's inner model)."""
    t = torch.tensor(ids, dtype=torch.long)
    hidden = model(t, torch.arange(len(ids)))
    logits = model.compute_logits(hidden[start - 1:-1])
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, t[start:, None]).squeeze(1)


# ---- checkpoints and run log -------------------------------------------------------------------------

def _step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(run_dir: Path, step: int, adapter: LoraAdapter, state: dict[str, Any], keep: int = 2) -> Path:
    """Write a complete checkpoint or nothing (temp dir + rename); keep the newest ``keep``."""
    final = _step_dir(run_dir, step)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_adapter(tmp / "adapter.safetensors", adapter, dtype=torch.float32)
    state = dict(state, step=step, py_random=random.getstate(), torch_rng=torch.get_rng_state())
    torch.save(state, tmp / "state.pt")
    (tmp / "COMPLETE").write_text(json.dumps({"step": step, "time": time.time()}))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    done = complete_checkpoints(run_dir)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in (run_dir / "checkpoints").glob("*.tmp-*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and ".tmp-" not in p.name and (p / "COMPLETE").exists()
                  and (p / "adapter.safetensors").exists() and (p / "state.pt").exists())


def latest_checkpoint(run_dir: Path) -> tuple[LoraAdapter, dict[str, Any]] | None:
    done = complete_checkpoints(run_dir)
    if not done:
        return None
    last = done[-1]
    state = torch.load(last / "state.pt", weights_only=False)
    return load_adapter(last / "adapter.safetensors"), state


def restore_rng(state: dict[str, Any]) -> None:
    if "py_random" in state:
        random.setstate(state["py_random"])
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])


class RunLog:
    """Append-only JSONL of step records; :meth:`truncate_after` drops records newer than a
    resumed checkpoint so the log matches the weights."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


def write_config(run_dir: Path, cfg: Any) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))


def check_resume_config(run_dir: Path, cfg: Any, fields: Iterable[str]) -> None:
    """A resumed run must keep the settings that shape its data and weights."""
    p = run_dir / "config.json"
    if not p.exists():
        return
    old = json.loads(p.read_text())
    new = json.loads(json.dumps(asdict(cfg), default=str))
    diff = [f for f in fields if old.get(f) != new.get(f)]
    if diff:
        raise TrainConfigError(f"{run_dir} holds a run with different {', '.join(diff)} "
                               f"({', '.join(f'{f}={old.get(f)!r}' for f in diff)}): use a new --out directory "
                               "or the same settings to resume")
