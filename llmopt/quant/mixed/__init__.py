"""Mixed precision per layer: estimate how much each linear hurts in each candidate format,
choose one format *and group size* per linear under an average-bits budget
(:func:`allocate_bits`), and apply the plan (:func:`quantize_mixed`).

Candidates. A candidate is a format name (``"int4"``: the caller's ``group_size``) or a spec
``"int4:g32"`` (format + its own group size, see :func:`parse_spec`). :func:`candidate_specs` gives
the default menu of a module: int4 / int3 / int2 / int8 at every group size of
``DEFAULT_GROUP_SIZES`` that divides the module's ``in_features`` and has a native kernel
(``kernels.qlinear.supports_native``), so the allocator can trade group size against width
(e.g. int4 g32 = 5.0 bits, g64 = 4.5, g128 = 4.25, per row ~4.05; int3 g64 = 3.5 + block padding).
Every ``QuantLinear`` carries its own ``fmt`` and ``group_size``; checkpoints store both per module.

Sensitivity (two estimators, same output ``{module: {candidate: estimated KL increase}}``):

* :func:`fisher_sensitivity` (default, fast): one forward + ``samples`` backward passes of the
  calibration set give every linear's inputs ``X`` and the gradients ``G`` of ``-log q(y)`` w.r.t.
  its output, with ``y`` sampled from the model itself, i.e. the Fisher of the next-token
  distribution. The KL increase of perturbing that output by ``dY = X dW^T`` is
  ``~ 0.5 * mean_t E_y[(g_t . dY_t)^2]`` (second order; the first order term vanishes at the float
  model). For ``qkv_proj`` the perturbation is first pushed exactly through the layer's attention
  (and ``o_proj``), for ``gate_up_proj`` through SwiGLU (and ``down_proj``), so the q.k and gate
  non-linearities are modeled instead of linearized. Cost: one forward + ``samples`` backwards of
  the calibration tokens, then per (module, candidate) one RTN and a few ``T x K x N`` products.
* :func:`layer_sensitivity` (the original, slow): the measured KL with that module ALONE quantized,
  one partial forward per (module, candidate).

:func:`plan_mixed` is the whole pipeline the CLI runs: Fisher estimate -> allocation ->
re-measurement: the real calibration KL of each module type's part of the plan (all its modules
quantized at once, the rest float) is compared with the sum of their estimates, each type's
estimates are rescaled by that ratio (this catches what the per-module second-order estimate
misses: interactions between modules, curvature) and the allocation is redone, ``refine`` times.

Bits are the formats' real stored bits per weight (codes incl. block padding + scales + mins) at
the group size, measured with the real packer on one row of the module's ``in_features``.

Measured (SmolLM2-135M, a Q4_1 GGUF: its weights already sit on a group-32 int4 grid, so int4 g32
is lossless; ``benchmarks/mixed_precision.py``, one core, 40 held-out texts / 8382 tokens, lm_head
float; fp32 ppl 17.339): uniform int4 g64 RTN (4.5 bits) 23.635 (+36.3%); ``--bits 4`` RTN
(4.000 bits: qkv mostly int4 g32, down_proj int3 g128, o/gate_up int3 g64 or int4 per row)
24.253 (+39.9%, a miss: every sub-4.5-bit option of this model is expensive and int3 pays 11%
block padding at in_features 576); the same plan with GPTQ (``--method gptq``) 19.783 (+14.1%),
better than uniform int4 g64 GPTQ at 4.5 bits (20.427). Plan search: ~3.5-5 min (16 x 128
tokens); the previous per-module KL search took ~27 min for a 4-format menu.
"""

from __future__ import annotations

from .allocation import allocate_bits, bits_range, menu_target, parse_menu, plan_bits
from .apply import quantize_mixed
from .plan import plan_mixed
from .sensitivity import fisher_sensitivity, layer_sensitivity
from .spec import (
    DEFAULT_CANDIDATES,
    DEFAULT_GROUP_SIZES,
    WIDTH_FORMATS,
    candidate_specs,
    format_bits,
    linear_sizes,
    parse_spec,
    quantizable_linears,
    spec_bits,
    spec_name,
)
from .spec import Progress as Progress
from .spec import _fits as _fits  # the fit rule, pinned by tests

__all__ = [
    "layer_sensitivity",
    "fisher_sensitivity",
    "allocate_bits",
    "quantize_mixed",
    "plan_mixed",
    "format_bits",
    "spec_bits",
    "parse_spec",
    "spec_name",
    "candidate_specs",
    "linear_sizes",
    "parse_menu",
    "menu_target",
    "bits_range",
    "plan_bits",
    "quantizable_linears",
    "WIDTH_FORMATS",
    "DEFAULT_CANDIDATES",
    "DEFAULT_GROUP_SIZES",
]
