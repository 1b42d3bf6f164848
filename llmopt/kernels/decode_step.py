"""The native decode step (``csrc/decode.cpp``): the whole decoder stack of a pure decode step in
one native call, and the int8 x int8-activation lm_head.

This module only binds the extension. Walking a model to collect its tensors, and deciding when a
model or a step qualifies, is ``llmopt.engine.fused_decode`` (it runs the model, so it lives next
to the model runner).
"""

from __future__ import annotations

from types import ModuleType

from .build import extension_loader, native_enabled

__all__ = ["native", "native_available"]

_native = extension_loader("llmopt_decode", ["decode.cpp"])


def native() -> ModuleType | None:
    """The ``llmopt_decode`` extension (``DecodeStep``, ``I8Linear``, ``linear_a8``), or None when
    the native kernels are off or did not build."""
    return _native() if native_enabled() else None


def native_available() -> bool:
    return native() is not None
