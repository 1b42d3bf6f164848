"""``QuantLinear``: a drop-in ``nn.Linear`` replacement holding a packed quantized weight, and
``quantize_model`` which swaps the ``nn.Linear`` modules of a model.

The state dict holds only plain tensors (``qweight``, ``scales``, optional ``mins``, optional
``bias``) so it can be written with ``safetensors``; the format name and group size are module
attributes (``fmt``, ``group_size``) that a checkpoint writer must store alongside (e.g. in the
safetensors metadata) and pass back to :meth:`QuantLinear.from_packed`.

``quantize_model`` also swaps input embeddings for :class:`~llmopt.quant.embedding.QuantEmbedding`
(by default: a table tied to the quantized ``lm_head`` then shares the head's packed tensors).
It works on a live float model (``llmopt quantize``, the calibrating quantizers); the engine's
quantize-on-load builds the model with :func:`rtn_quant_config` instead (the same modules, made by
:class:`RTNMethod` once, inside the model's loading; see ``llmopt.models.linear``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from llmopt.formats.layouts import FORMATS, QuantizedWeight, effective_group_size, quantize
from llmopt.models.linear import PACKED, EmbeddingMethod, LinearMethod, QuantConfig

from ._packed import PackedWeightViews

log = logging.getLogger(__name__)

__all__ = ["QuantLinear", "quantize_model", "tied_embeddings", "DEFAULT_SKIP", "QUANTIZE_LM_HEAD", "LM_HEAD_FMT",
           "QUANTIZE_EMBED", "RTNMethod", "TiedQuantEmbeddingMethod", "rtn_quant_config"]

DEFAULT_SKIP = ("lm_head", "embed")

# Defaults of ``quantize_model(skip=None)`` (the engine's ``LLM(quant=...)`` path), the same as
# ``llmopt.config.KernelSettings`` (quant_lm_head / lm_head_fmt / quant_embed), where the engine
# takes them from (env overrides ``LLMOPT_QUANT_LM_HEAD`` / ``LLMOPT_QUANT_EMBED`` are read there).
# See quantize_model for the measured trade-off.
QUANTIZE_LM_HEAD: bool = True
LM_HEAD_FMT: str | None = "int8"  # None: the model's format
# A tied input embedding becomes a QuantEmbedding sharing the quantized head's packed tensors
# (False: the pre-QuantEmbedding behaviour, head and table twice).
QUANTIZE_EMBED: bool = True


class QuantLinear(PackedWeightViews, nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored in a packed quantized format (see ``formats``)."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.fmt = qw.fmt
        self.group_size = qw.group_size
        self.out_features, self.in_features = qw.shape
        for name, t in qw.tensors.items():
            self.register_buffer(name, t.contiguous())
        self._tensor_names = tuple(qw.tensors.keys())
        if bias is not None:
            self.register_buffer("bias", bias.detach().float().contiguous())
        else:
            self.bias = None
        self._fwd = None  # cached dispatch (kernels.qlinear.make_forward), rebuilt after moves

    def __setattr__(self, name, value):
        if name in self.__dict__.get("_tensor_names", ()) or name == "bias":
            self.__dict__["_fwd"] = None  # a packed tensor was replaced: drop the cached dispatch
        super().__setattr__(name, value)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, group_size: int = 64,
                    scale_dtype: torch.dtype = torch.float16, search: bool | None = None) -> QuantLinear:
        """Quantize an ``nn.Linear`` (RTN). ``group_size`` is ignored by per-channel / fixed-block
        formats (fp8, w8a8: per channel; fp4: 32). ``search``: see ``formats.quantize``."""
        qw = quantize(linear.weight.detach(), fmt, group_size, scale_dtype=scale_dtype, search=search)
        return cls(qw, linear.bias)

    @classmethod
    def from_packed(cls, fmt: str, group_size: int, in_features: int, out_features: int,
                    tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> QuantLinear:
        """Rebuild from saved tensors (``qweight``, ``scales``, [``mins``], [``bias``])."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        t = dict(tensors)
        if bias is None:
            bias = t.pop("bias", None)
        else:
            t.pop("bias", None)
        need = {"qweight", "scales"} | ({"mins"} if FORMATS[fmt].affine else set())
        missing = need - set(t)
        if missing:
            raise ValueError(f"{fmt}: missing packed tensors {sorted(missing)}")
        qw = QuantizedWeight(fmt, (int(out_features), int(in_features)), int(group_size),
                             {k: t[k] for k in ("qweight", "scales", "mins") if k in t})
        return cls(qw, bias)

    def _apply(self, fn, recurse=True):
        """Device moves apply; dtype casts (``model.half()``, ``model.to(torch.bfloat16)``) do not
        touch the packed tensors, whose dtypes are part of the format."""
        names = self._tensor_names + (("bias",) if self.bias is not None else ())
        for name in names:
            t = self._buffers[name]
            nt = fn(t)
            if nt.dtype != t.dtype:
                nt = t.to(device=nt.device)
            self._buffers[name] = nt
        self._fwd = None
        return self

    # -- views (qweight_packed, bits_per_weight, weight: see PackedWeightViews) -----------------
    @property
    def _packed_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def _packed(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self._tensor_names}

    def packed_state(self) -> dict[str, torch.Tensor]:
        """Plain tensors to save (same keys as ``state_dict()``)."""
        d = self._packed()
        if self.bias is not None:
            d["bias"] = self.bias
        return d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fwd = self._fwd
        if fwd is None:
            from ..kernels.qlinear import make_forward

            fwd = self._fwd = make_forward(self.qweight_packed, self.bias)
        return fwd(x)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._fwd = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, "
                f"bpw={self.bits_per_weight:.3f}")


def tied_embeddings(model: nn.Module) -> dict[str, str]:
    """``{embedding name: lm_head name}`` of the float ``nn.Embedding`` modules whose weight *is* a
    float ``lm_head``'s weight (tied parameters, as ``Transformer`` ties them)."""
    heads = {n: m for n, m in model.named_modules()
             if n.rpartition(".")[2] == "lm_head" and isinstance(m, nn.Linear)}
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Embedding):
            for hn, h in heads.items():
                if h.weight is m.weight:
                    out[n] = hn
    return out


def quantize_model(model: nn.Module, fmt: str, group_size: int = 64, skip: Sequence[str] | None = None,
                   scale_dtype: torch.dtype = torch.float16, search: bool | None = None,
                   quantize_lm_head: bool | None = None, lm_head_fmt: str | None = None,
                   quantize_embedding: bool | str | None = None, embedding_fmt: str | None = None) -> nn.Module:
    """Replace (in place) every ``nn.Linear`` whose qualified name contains none of the ``skip``
    substrings by a :class:`QuantLinear`; returns ``model``.

    ``skip`` None: :data:`DEFAULT_SKIP` with the engine's defaults for the head and the embedding
    (below); a ``skip`` list given by the caller keeps its literal meaning.

    ``quantize_lm_head``: also quantize ``lm_head`` (in ``lm_head_fmt``, default ``fmt``), whatever
    ``skip`` says about it. None means :data:`QUANTIZE_LM_HEAD` / :data:`LM_HEAD_FMT` when ``skip``
    is None (the engine's path) and "follow ``skip``" otherwise (callers passing their own skip
    list keep their behaviour).
    The head is the largest matrix of small models (SmolLM2-135M: 49152 x 576, 113 MB fp32, ~40% of
    an int4 decode step). Engine default: int8 (g = ``group_size``, exact fp32 activations), measured
    on SmolLM2-135M-Instruct int4 g64 (ppl on 10 pydoc topics / 4236 tokens): float head 17.225,
    int8 head 17.234 (+0.05%), w8a8 head 17.456 (+1.3%), int4 head 18.495 (+7.4%); float model
    12.821. Head time per decode step (1 thread, M=1): fp32 7.4 ms, int8 1.5 ms, int4 1.0 ms.

    ``quantize_embedding`` (the ``nn.Embedding`` modules; ``skip`` does not apply to them):

    - tied embedding (its weight *is* a quantized ``lm_head``'s weight): replaced by a
      :class:`~llmopt.quant.embedding.QuantEmbedding` that shares the head's packed tensors (one
      copy in memory and in checkpoints; the table is then the head's ``fmt`` / group size, and
      ``embedding_fmt`` may only name that format). With the head left float the table stays float
      (``quantize_embedding=True`` then raises ``ValueError``).
    - untied embedding: only when ``quantize_embedding`` is True, as its own QuantEmbedding in
      ``embedding_fmt``, default the quantized head's format (else ``lm_head_fmt`` or ``fmt``),
      group ``group_size`` along the hidden dim. Off by default: unlike the tied case it saves no
      copy, and a gather is cheap in float (only the file shrinks).
    - "tied": tied embeddings whose head is quantized share it, everything else stays float
      without complaint (what the engine passes when ``KernelSettings.quant_embed`` is on).
    - None: "tied" if :data:`QUANTIZE_EMBED` on the engine's path (``skip`` and
      ``quantize_lm_head`` None), off otherwise (callers that choose the head themselves choose
      the embedding too).

    A layer whose ``in_features`` is not a multiple of the format's group size is left in float
    (logged), so odd shapes never break a model.
    """
    from .embedding import QuantEmbedding

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {sorted(FORMATS)}")
    if lm_head_fmt is not None and lm_head_fmt not in FORMATS:
        raise ValueError(f"unknown lm_head format {lm_head_fmt!r}; known: {sorted(FORMATS)}")
    if embedding_fmt is not None and embedding_fmt not in FORMATS:
        raise ValueError(f"unknown embedding format {embedding_fmt!r}; known: {sorted(FORMATS)}")
    if quantize_embedding not in (None, True, False, "tied"):
        raise ValueError(f"quantize_embedding must be True, False, 'tied' or None, got {quantize_embedding!r}")
    engine_path = skip is None and quantize_lm_head is None
    skip = DEFAULT_SKIP if skip is None else tuple(skip)
    if engine_path:
        quantize_lm_head = QUANTIZE_LM_HEAD
        if lm_head_fmt is None:
            lm_head_fmt = LM_HEAD_FMT
    ties = tied_embeddings(model)  # before the heads are swapped
    embeds = {n: m for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    targets = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if name.rpartition(".")[2] == "lm_head" and quantize_lm_head is not None:
            if quantize_lm_head:
                targets.append((name, lm_head_fmt or fmt))
            continue
        if not any(s in name for s in skip):
            targets.append((name, fmt))
    for name, f in targets:
        lin = model.get_submodule(name)
        gs = effective_group_size(f, lin.in_features, group_size)
        if lin.in_features % gs:
            log.warning("quantize_model: keeping %s in float (in_features=%d not a multiple of %d)",
                        name, lin.in_features, gs)
            continue
        model.set_submodule(name, QuantLinear.from_linear(lin, f, group_size, scale_dtype=scale_dtype, search=search))

    if quantize_embedding is None:
        quantize_embedding = "tied" if QUANTIZE_EMBED and engine_path else False
    explicit = quantize_embedding is True
    if not quantize_embedding:
        return model
    qheads = [m for n, m in model.named_modules() if n.rpartition(".")[2] == "lm_head" and isinstance(m, QuantLinear)]
    for ename, emb in embeds.items():
        dtype = emb.weight.dtype if emb.weight.is_floating_point() else torch.float32
        hname = ties.get(ename)
        if hname is not None:
            head = model.get_submodule(hname)
            if not isinstance(head, QuantLinear):
                if explicit:
                    raise ValueError(f"quantize_embedding: {ename} is tied to {hname}, which stays float: a tied "
                                     "embedding is quantized by sharing the quantized head (quantize_lm_head=True)")
                continue
            if embedding_fmt is not None and embedding_fmt != head.fmt:
                raise ValueError(f"quantize_embedding: {ename} is tied to {hname} ({head.fmt}) and shares its packed "
                                 f"tensors: embedding_fmt={embedding_fmt!r} cannot differ from it")
            model.set_submodule(ename, QuantEmbedding.tied_to(head, dtype=dtype))
            continue
        if not explicit:
            continue  # the default quantizes tied tables only
        f = embedding_fmt or (qheads[0].fmt if len(qheads) == 1 else None) or lm_head_fmt or fmt
        gs = effective_group_size(f, emb.embedding_dim, group_size)
        if emb.embedding_dim % gs:
            log.warning("quantize_model: keeping %s in float (embedding_dim=%d not a multiple of %d)",
                        ename, emb.embedding_dim, gs)
            continue
        model.set_submodule(ename, QuantEmbedding.from_embedding(emb, f, group_size, scale_dtype=scale_dtype,
                                                                search=search))
    return model


# ---- linear methods: quantize on load ------------------------------------------------------------
class RTNMethod(LinearMethod):
    """Round-to-nearest ``fmt`` at ``group_size`` of the loaded float weight (``LLM(quant=fmt)``):
    the projection is loaded float and becomes a :class:`QuantLinear` once, in
    ``Transformer.process_weights_after_loading``. A weight whose in_features are not a multiple of
    the group keeps ``fallback`` (float, packed where possible) with a warning."""

    def __init__(self, fmt: str, group_size: int = 64, fallback: LinearMethod = PACKED,
                 scale_dtype: torch.dtype = torch.float16, search: bool | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; known: {sorted(FORMATS)}")
        self.fmt, self.group_size, self.fallback = fmt, group_size, fallback
        self.scale_dtype, self.search = scale_dtype, search
        self.name = fmt

    def process_after_loading(self, module: nn.Module, name: str) -> nn.Module:
        if not isinstance(module, nn.Linear):
            return module
        gs = effective_group_size(self.fmt, module.in_features, self.group_size)
        if module.in_features % gs:
            log.warning("quantize on load: keeping %s in float (in_features=%d not a multiple of %d)",
                        name, module.in_features, gs)
            return self.fallback.process_after_loading(module, name)
        return QuantLinear.from_linear(module, self.fmt, self.group_size, scale_dtype=self.scale_dtype,
                                       search=self.search)


class TiedQuantEmbeddingMethod(EmbeddingMethod):
    """A tied input embedding reads the quantized head's packed tensors (:meth:`QuantEmbedding.tied_to`,
    one copy); untied or with a float head it stays an ``nn.Embedding``."""

    name = "tied-quant"

    def process_after_loading(self, module: nn.Module, lm_head: nn.Module, tied: bool) -> nn.Module:
        if not (tied and isinstance(module, nn.Embedding) and isinstance(lm_head, QuantLinear)):
            return module
        from .embedding import QuantEmbedding

        dtype = module.weight.dtype if module.weight.is_floating_point() else torch.float32
        return QuantEmbedding.tied_to(lm_head, dtype=dtype)


def rtn_quant_config(fmt: str, group_size: int = 64, quantize_lm_head: bool = True, lm_head_fmt: str | None = "int8",
                     quantize_embedding: bool = True, fallback: LinearMethod = PACKED) -> QuantConfig:
    """What ``LLM(quant=fmt)`` builds: decoder projections RTN ``fmt``, the head in ``lm_head_fmt``
    (or ``fmt``) when ``quantize_lm_head``, else ``fallback``; a tied embedding shares a quantized
    head when ``quantize_embedding`` (the defaults of ``llmopt.config.KernelSettings``)."""
    if lm_head_fmt is not None and lm_head_fmt not in FORMATS:
        raise ValueError(f"unknown lm_head format {lm_head_fmt!r}; known: {sorted(FORMATS)}")
    body = RTNMethod(fmt, group_size, fallback)
    head = RTNMethod(lm_head_fmt or fmt, group_size, fallback) if quantize_lm_head else fallback
    emb = TiedQuantEmbeddingMethod() if quantize_embedding else EmbeddingMethod()
    return QuantConfig(default=body, lm_head=head, embedding=emb)
