"""How a projection holds and runs its weight: ``LinearMethod`` and the model's ``QuantConfig``.

vLLM's idea with gpt-fast's size. The :class:`~llmopt.models.transformer.Transformer` is built with
a :class:`QuantConfig`; every projection (``layers.<i>.self_attn.qkv_proj`` ... ``lm_head``) asks it
for its method by module name and lets the method build the module:

* ``create(in_features, out_features, bias, name)``: the module the loader fills. Built on the meta
  device; a method whose final form does not depend on the loaded float weight (a quantized
  checkpoint's packed tensors, a GGUF file's own blocks) returns that final module here already.
* ``process_after_loading(module, name)``: called once by ``Transformer.process_weights_after_loading``
  (the loader calls it after the weights are in) and returns the module that runs. Methods that
  derive their form from the float weight do it here: fp32 panel packing (:class:`PackedMethod`),
  round-to-nearest quantization on load (``llmopt.quant.linear.RTNMethod``), the GGUF blocks
  (``llmopt.models.gguf_linear.GGUFMethod``).

Nothing outside the model replaces its projections: the engine only chooses the config. (The
calibrating quantizers, GPTQ / AWQ / mixed, still replace modules of a live float model layer by
layer, because each quantized layer must feed the next one's calibration inputs; what they produce
is saved as a checkpoint and loaded back through methods.)

The input embedding has the same two steps in :class:`EmbeddingMethod` (``process_after_loading``
also sees the final ``lm_head``, so a tied table can share the head's packed weight).

This module sits in ``models/`` (layer 2): methods of lower layers (dense fp32) live here, methods
of ``quant/`` (RTN, checkpoints) are handed in by the caller, so ``models/`` never imports ``quant/``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["LinearMethod", "FloatMethod", "PackedMethod", "EmbeddingMethod", "QuantConfig", "FLOAT", "PACKED",
           "TokenKindLinear", "project"]


class TokenKindLinear(nn.Module):
    """A projection whose arithmetic may depend on the kind of each row's token: ``forward(x,
    generated)`` with ``generated`` a bool ``[rows]`` (True: a token the model generated, i.e. a
    position at or after its sequence's prompt length; False: a prompt token), or None (every row
    a prompt token: scoring, a plain forward). The GGUF ``by-kind`` activation mode is one."""

    def forward(self, x: torch.Tensor, generated: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


def project(lin: nn.Module, x: torch.Tensor, generated: torch.Tensor | None) -> torch.Tensor:
    """``lin(x)``, handing the rows' token kinds to a :class:`TokenKindLinear`."""
    if isinstance(lin, TokenKindLinear):
        return lin(x, generated)
    return lin(x)


class LinearMethod:
    """A way to hold and run one projection (base: a float ``nn.Linear``, as Hugging Face has it)."""

    name = "float"

    def create(self, in_features: int, out_features: int, bias: bool, name: str) -> nn.Module:
        """The module of projection ``name`` that the loader fills (built on the meta device)."""
        return nn.Linear(in_features, out_features, bias=bias)

    def process_after_loading(self, module: nn.Module, name: str) -> nn.Module:
        """The module that runs, given the loaded one (default: the same module)."""
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class FloatMethod(LinearMethod):
    """``nn.Linear`` (torch's GEMM): any dtype and device, autograd; what training and the HF parity
    reference use."""


class PackedMethod(LinearMethod):
    """fp32 weight packed once into 16-row panels for the AVX2/FMA GEMM (``kernels.dense``).

    Keeps the ``nn.Linear`` (and says so once per model, at debug level) where the native kernel is
    not available (``LLMOPT_NATIVE=0``, failed build) or the weight is not CPU float32."""

    name = "fp32-packed"

    def process_after_loading(self, module: nn.Module, name: str) -> nn.Module:
        from llmopt.kernels.dense import PackedLinear, native_available

        if (type(module) is not nn.Linear or module.weight.dtype != torch.float32
                or module.weight.device.type != "cpu" or not native_available()):
            return module
        return PackedLinear.from_linear(module)


FLOAT = FloatMethod()
PACKED = PackedMethod()


class EmbeddingMethod:
    """How the input embedding holds its table (base: a float ``nn.Embedding``)."""

    name = "float"

    def create(self, num_embeddings: int, embedding_dim: int) -> nn.Module:
        return nn.Embedding(num_embeddings, embedding_dim)

    def process_after_loading(self, module: nn.Module, lm_head: nn.Module, tied: bool) -> nn.Module:
        """The embedding that runs; ``lm_head`` is the head as it will run, ``tied`` the config's
        ``tie_word_embeddings``."""
        return module

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


@dataclass
class QuantConfig:
    """Which method each projection of a model uses.

    ``method_for(name)``: ``modules[name]`` if present, else ``lm_head`` for the output layer (when
    set), else ``default``. Names are the llmopt module names (``layers.3.mlp.down_proj``,
    ``lm_head``), so a mixed-precision checkpoint gives one method per module."""

    default: LinearMethod = field(default_factory=FloatMethod)
    lm_head: LinearMethod | None = None
    modules: dict[str, LinearMethod] = field(default_factory=dict)
    embedding: EmbeddingMethod = field(default_factory=EmbeddingMethod)

    def method_for(self, name: str) -> LinearMethod:
        m = self.modules.get(name)
        if m is not None:
            return m
        if name == "lm_head" and self.lm_head is not None:
            return self.lm_head
        return self.default

    def describe(self) -> str:
        kinds = sorted({m.name for m in self.modules.values()} | {self.default.name}
                       | ({self.lm_head.name} if self.lm_head is not None else set()))
        return "+".join(kinds)
