"""Difficulty probe: how likely the model is to get a prompt wrong, read from the prompt itself.

A logistic regression on the model's final-norm hidden state at the last prompt token (the row the
engine samples the first output token from, so reading it costs one dot product per request). It
is trained per model (``llmopt train probe``, ``llmopt.train.probe``) on that model's own greedy
answers to reasoning-gym items, labelled by their verifiers: among the outputs still thinking after
``think_tokens`` tokens, wrong (1) against right (0).

The engine uses it for a difficulty exit (``SamplingParams.difficulty_exit = t``): when the
probe's P(wrong) of a request is above ``t``, its thinking is closed at ``difficulty_exit_tokens``
think tokens (in place of the token the model chose there, as the think gate does) and the model
answers from what it has. On the shipped 135M reasoning model the wrong answers think longest (leg
counting: 141-289 think tokens against 71-101 for the right ones) and begin as sure of themselves as
the right ones, so the confidence signals miss them; the prompt state separates them (docs/reasoning.md).

A probe file is a safetensors file: ``weight`` [hidden] and ``bias`` [1] with the input
standardization folded in (``P(wrong) = sigmoid(h . weight + bias)``), and metadata (``PROBE_KIND``,
the model it was trained on, its hidden size, the label's think tokens, the training items and seeds).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

PROBE_KIND = "llmopt.difficulty_probe"
PROBE_VERSION = "1"
PROBE_LABEL_TOKENS = 24  # llmopt train probe: examples are the outputs still thinking after this many tokens


@dataclass(frozen=True)
class DifficultyProbe:
    """P(wrong) = sigmoid(hidden . weight + bias) on the prompt's last final-norm hidden state."""

    weight: torch.Tensor  # [hidden], float32, the standardization folded in
    bias: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[0])

    def p_wrong(self, hidden: torch.Tensor) -> torch.Tensor:
        """P(wrong) of each row of ``hidden`` [rows, hidden_size] (any float dtype), float32 [rows]."""
        if hidden.dim() != 2 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"the difficulty probe reads hidden states of size {self.hidden_size}, "
                             f"got shape {tuple(hidden.shape)}")
        return torch.sigmoid(hidden.float() @ self.weight + self.bias)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"kind": PROBE_KIND, "version": PROBE_VERSION, "meta": json.dumps(self.meta, sort_keys=True)}
        save_file({"weight": self.weight.float().contiguous(), "bias": torch.tensor([self.bias], dtype=torch.float32)},
                  str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> DifficultyProbe:
        """Read a probe file; a missing, corrupt or foreign file raises ``ValueError`` saying what it is."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"difficulty probe {str(path)!r} does not exist: train one with `llmopt train probe "
                             f"--model MODEL --out FILE` (or leave it unset for the model's shipped probe)")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
        except Exception as e:  # safetensors raises its own error types for a bad header / missing tensor
            raise ValueError(f"{str(path)!r} is not a difficulty probe file (safetensors with 'weight' and "
                             f"'bias'): {e}") from None
        if header.get("kind") != PROBE_KIND:
            raise ValueError(f"{str(path)!r} is not a difficulty probe (metadata kind {header.get('kind')!r}, "
                             f"expected {PROBE_KIND!r}; `llmopt train probe` writes one)")
        if weight.dim() != 1 or bias.numel() != 1 or not torch.isfinite(weight).all() or \
                not torch.isfinite(bias).all():
            raise ValueError(f"{str(path)!r}: a difficulty probe holds a finite 1-D 'weight' and one 'bias', got "
                             f"shapes {tuple(weight.shape)} and {tuple(bias.shape)}")
        return cls(weight.float().contiguous(), float(bias.item()), json.loads(header.get("meta", "{}")))


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float = 10.0, max_iter: int = 300,
              meta: dict[str, Any] | None = None) -> DifficultyProbe:
    """Logistic regression of ``y`` (1 = wrong) on standardized ``x`` [n, hidden] with an L2 penalty of
    ``l2 * |w|^2 / n`` (L-BFGS, float64); the standardization is folded into the returned weights."""
    if x.dim() != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"fit_probe takes x [n, hidden] and y [n], got {tuple(x.shape)} and {tuple(y.shape)}")
    labels = set(y.tolist())
    if not labels <= {0, 1} or len(labels) < 2:
        raise ValueError(f"fit_probe needs both right (0) and wrong (1) examples, got labels {sorted(labels)}")
    x64, y64 = x.double(), y.double()
    mu, sd = x64.mean(0), x64.std(0) + 1e-6
    xn = (x64 - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")
    n = len(y64)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xn @ w + b, y64) + l2 * (w * w).sum() / n
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_eff = (w.detach() / sd)
    b_eff = float(b.detach().item() - (mu * w_eff).sum().item())
    return DifficultyProbe(w_eff.float(), b_eff, dict(meta or {}, l2=l2, examples=n))


def auc(score: torch.Tensor, y: torch.Tensor) -> float:
    """Area under the ROC curve of ``score`` for ``y == 1`` (ties count half); NaN without both labels."""
    pos, neg = score[y == 1].double(), score[y == 0].double()
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    gt = (pos[:, None] > neg[None, :]).double().mean()
    eq = (pos[:, None] == neg[None, :]).double().mean()
    return float(gt + 0.5 * eq)
