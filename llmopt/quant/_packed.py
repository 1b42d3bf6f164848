"""Views shared by the modules that hold a packed :class:`~llmopt.formats.layouts.QuantizedWeight`
(:class:`~llmopt.quant.linear.QuantLinear`, :class:`~llmopt.quant.embedding.QuantEmbedding`)."""

from __future__ import annotations

import torch

from llmopt.formats.layouts import QuantizedWeight, dequantize


class PackedWeightViews:
    """``qweight_packed`` / ``bits_per_weight`` / ``weight`` of a module with the attributes ``fmt``
    and ``group_size``, its ``[rows, cols]`` shape as ``_packed_shape`` and its packed tensors as
    ``_packed()``."""

    fmt: str
    group_size: int

    @property
    def _packed_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def _packed(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def qweight_packed(self) -> QuantizedWeight:
        return QuantizedWeight(self.fmt, self._packed_shape, self.group_size, self._packed())

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: codes (incl. block padding) + scales + mins (bias excluded)."""
        return self.qweight_packed.bits_per_weight

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized fp32 weight (an embedding's table; reference decode; for inspection / fallbacks)."""
        return dequantize(self.qweight_packed)
