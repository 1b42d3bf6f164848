"""Checks on weights as they load: a corrupt file is refused at load, not found by its answers.

A model file with a stretch of bytes overwritten (0xff makes NaN scales in a quantized block and
NaN floats) loads, and then greedy decoding returns empty text and sampling fails deep inside
with "probability tensor contains inf/nan". :func:`finite_weights` checks every checkpoint tensor
on its way into the model and names the first one that holds a NaN or an infinity.

The test is the minimum and maximum of each tensor (no temporary the size of the tensor; NaN
propagates into both and an infinity becomes one of them), so it costs a small part of the load:
see ``benchmarks/load_check.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from llmopt.config import ModelLoadError


def check_finite(name: str, tensor: torch.Tensor, source: str) -> None:
    """Raise ``ModelLoadError`` naming ``name`` and ``source`` if ``tensor`` holds a NaN or inf."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if tensor.dtype in (torch.float32, torch.float16, torch.float64) and tensor.device.type == "cpu":
        # numpy's min/max: single-threaded SIMD, so a busy machine does not stall it the way it
        # stalls an OpenMP reduction (SmolLM2 load at 2 threads on a busy machine: 1.3% vs 29%)
        a = tensor.detach().numpy()
        if np.isfinite(a.min()) and np.isfinite(a.max()):
            return
    else:
        lo, hi = torch.aminmax(tensor)
        if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
            return
    bad = tensor.numel() - int(torch.isfinite(tensor).sum())  # the slow count, only on failure
    raise ModelLoadError(
        f"{source}: tensor {name!r} holds {bad:,} non-finite values (NaN or infinity) of "
        f"{tensor.numel():,}; the file is corrupt: download or convert it again")


def finite_weights(weights: Iterable[tuple[str, torch.Tensor]], source: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` unchanged, each tensor checked with :func:`check_finite` as it passes."""
    for name, tensor in weights:
        check_finite(name, tensor, source)
        yield name, tensor
