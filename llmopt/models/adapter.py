"""LoRA adapters as llmopt ships them: one safetensors file, merged into the loaded weights.

File layout (written by ``llmopt.train``; PEFT is not needed to read it):

- tensors ``<module>.lora_A`` ``[r, in_features]`` and ``<module>.lora_B`` ``[out_features, r]``
  (usually fp16), ``<module>`` a Linear of our ``Transformer`` (``layers.20.self_attn.qkv_proj``);
- metadata ``format`` = ``llmopt-lora-v1``, ``scale`` (alpha / r), ``base_fingerprint`` (see
  :func:`base_fingerprint`), ``base_name``, and free-form ``recipe``.

Merging adds ``scale * B @ A`` to each weight in fp32. An adapter whose fingerprint differs from
the loaded base model is refused (:class:`AdapterMismatchError`): it was trained on other weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmopt.config import ModelLoadError

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "llmopt-lora-v1"


class AdapterMismatchError(ModelLoadError):
    """The adapter was trained on a different base model."""


@dataclass
class LoraAdapter:
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], B [out, r])
    scale: float
    base_fingerprint: str
    base_name: str = ""
    recipe: str = ""

    @property
    def rank(self) -> int:
        """The largest rank over the adapted modules (a stacked adapter may mix ranks)."""
        return max((a.shape[0] for a, _ in self.tensors.values()), default=0)


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of the base model's shapes and a sample of its fp32 weights (the embedding's
    first rows and every layer's first projection rows): equal for the same checkpoint loaded
    the same way, different for another model or another quantization."""
    h = hashlib.sha256()
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        h.update(f"{cfg.arch}/{cfg.vocab_size}/{cfg.hidden_size}/{cfg.num_layers}/{cfg.intermediate_size}".encode())
    for name, p in sorted(_base_weights(model).items()):
        if name.endswith("embed_tokens.weight") or name.endswith("qkv_proj.weight") or name.endswith("down_proj.weight"):
            h.update(name.encode())
            h.update(p.detach()[:4].to(torch.float32).contiguous().numpy().round(5).tobytes())
    return h.hexdigest()[:16]


def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter names without PEFT's wrappers (``base_model.model.`` and ``.base_layer``)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        clean = name.replace("base_model.model.", "").replace(".base_layer", "")
        out[clean] = p
    return out


def save_adapter(path: str | Path, adapter: LoraAdapter, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``adapter`` to ``path`` atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {}
    for mod, (a, b) in adapter.tensors.items():
        flat[f"{mod}.lora_A"] = a.detach().to(dtype).contiguous()
        flat[f"{mod}.lora_B"] = b.detach().to(dtype).contiguous()
    meta = {"format": ADAPTER_FORMAT, "scale": repr(float(adapter.scale)),
            "base_fingerprint": adapter.base_fingerprint, "base_name": adapter.base_name,
            "recipe": adapter.recipe}
    tmp = path.with_name(path.name + ".tmp")
    save_file(flat, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_adapter(path: str | Path) -> LoraAdapter:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"adapter file {str(path)!r} does not exist: give a .safetensors file written by "
                             "`llmopt train sft` or `llmopt train grpo`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types on a damaged file
        raise ModelLoadError(f"adapter {str(path)!r} is not a readable safetensors file ({e}): retrain or "
                             "re-download it") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise ModelLoadError(f"adapter {str(path)!r} has format {meta.get('format')!r}, expected "
                             f"{ADAPTER_FORMAT!r}: export it with llmopt.train")
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for k in raw:
        if k.endswith(".lora_A"):
            mod = k[: -len(".lora_A")]
            if f"{mod}.lora_B" not in raw:
                raise ModelLoadError(f"adapter {str(path)!r} lacks {mod}.lora_B")
            tensors[mod] = (raw[k], raw[f"{mod}.lora_B"])
    if not tensors:
        raise ModelLoadError(f"adapter {str(path)!r} holds no LoRA tensors")
    return LoraAdapter(tensors, float(meta["scale"]), meta.get("base_fingerprint", ""),
                       meta.get("base_name", ""), meta.get("recipe", ""))


def merge_adapter(model: nn.Module, adapter: LoraAdapter, source: str = "adapter") -> int:
    """Add ``scale * B @ A`` to each adapted Linear of ``model`` (in place, fp32 math); returns
    how many were merged. Raises :class:`AdapterMismatchError` for another base model."""
    fp = base_fingerprint(model)
    if adapter.base_fingerprint != fp:
        raise AdapterMismatchError(
            f"{source} was trained on base model {adapter.base_name or '?'} (fingerprint "
            f"{adapter.base_fingerprint}), but the loaded model's fingerprint is {fp}: load the adapter "
            "on the base model it was trained on, or retrain it on this one")
    modules = dict(model.named_modules())
    for mod, (a, b) in adapter.tensors.items():
        lin = modules.get(mod)
        if not isinstance(lin, nn.Linear):
            raise AdapterMismatchError(f"{source} adapts {mod!r}, which is not a Linear of the loaded model")
        want = (lin.weight.shape[0], lin.weight.shape[1])
        if (b.shape[0], a.shape[1]) != want or a.shape[0] != b.shape[1]:
            raise AdapterMismatchError(f"{source}: {mod} has LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)}, "
                                       f"the model's weight is {want}")
        with torch.no_grad():
            delta = (b.to(torch.float32) @ a.to(torch.float32)) * adapter.scale
            lin.weight.add_(delta.to(lin.weight.dtype))
    log.info("merged %d LoRA modules from %s (rank %d)", len(adapter.tensors), source, adapter.rank)
    return len(adapter.tensors)


def stack_adapters(adapters: list[LoraAdapter], base_fingerprint: str, base_name: str = "",
                   recipe: str = "") -> LoraAdapter:
    """One adapter whose merge equals merging ``adapters`` one after another: per module the ranks
    are concatenated (``A = [A1; A2]``, ``B = [s1 B1, s2 B2]``, scale 1), so ``B @ A = s1 B1 A1 +
    s2 B2 A2`` exactly. ``base_fingerprint`` is that of the model the first adapter merges into
    (a later adapter was trained on top of the earlier ones merged, so its own fingerprint differs)."""
    if not adapters:
        raise ValueError("stack_adapters needs at least one adapter")
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for ad in adapters:
        for mod, (a, b) in ad.tensors.items():
            parts.setdefault(mod, []).append((a.to(torch.float32), b.to(torch.float32) * ad.scale))
    tensors = {mod: (torch.cat([a for a, _ in ab], 0), torch.cat([b for _, b in ab], 1)) for mod, ab in parts.items()}
    return LoraAdapter(tensors, 1.0, base_fingerprint, base_name, recipe)


def adapter_summary(adapter: LoraAdapter) -> str:
    return json.dumps({"modules": len(adapter.tensors), "rank": adapter.rank, "scale": adapter.scale,
                       "base": adapter.base_name, "fingerprint": adapter.base_fingerprint})
