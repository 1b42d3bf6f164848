"""``QuantEmbedding``: a drop-in ``nn.Embedding`` replacement holding the ``[vocab, hidden]`` table as
a packed :class:`~llmopt.formats.layouts.QuantizedWeight` (groups along the hidden dim), whose
forward gathers the packed rows of the input ids and dequantizes only those rows.

Why gathering packed rows is exact: every format of :mod:`llmopt.formats.layouts` packs each output
row (= table row = token) on its own. ``qweight`` is ``[N, Kp * bits / 8]`` (int4/int2/fp4 "8 lanes
x j" blocks, int3 2-bit + 1-bit planes, w4a8 ggml halves, int8/w8a8/fp8 natural order: all blocks of
one row follow each other, no block spans two rows), ``scales`` / ``mins`` are ``[N, K / gs]`` or
``[N]`` (per-channel fp8/w8a8). So ``index_select(0, ids)`` of every packed tensor is the packed
form of ``table[ids]``, and the reference decode (elementwise per row) gives bit for bit
``dequantize(table)[ids]``. A format outside :data:`ROW_PACKED_FORMATS`, or a packed tensor
whose first dim is not the row count, is refused with a ``ValueError``.

Tied models: :meth:`QuantEmbedding.tied_to` builds an embedding that reads the packed tensors of
the ``lm_head`` :class:`~llmopt.quant.linear.QuantLinear` (same storage: one copy in memory and in
the checkpoint). The head is referenced, not registered as a child module, so ``state_dict`` /
``named_modules`` list it once (under ``lm_head``) and device moves of the head are seen by the
embedding (``model.to(device)`` moves the head's buffers; the embedding reads them at call time).
"""

from __future__ import annotations

import torch
from torch import nn

from llmopt.formats.layouts import FORMATS, QuantizedWeight, dequantize, effective_group_size, quantize

from ._packed import PackedWeightViews

__all__ = ["QuantEmbedding", "ROW_PACKED_FORMATS"]

# formats whose packed tensors are per table row (checked against formats.py, see module doc)
ROW_PACKED_FORMATS = ("int8", "int4", "int3", "int2", "fp8", "fp4", "w8a8", "w4a8")

_PACKED_NAMES = ("qweight", "scales", "mins")


def _check_row_packed(qw: QuantizedWeight) -> None:
    if qw.fmt not in FORMATS:
        raise ValueError(f"QuantEmbedding: unknown format {qw.fmt!r}; known: {', '.join(sorted(FORMATS))}")
    if qw.fmt not in ROW_PACKED_FORMATS:
        raise ValueError(f"QuantEmbedding: format {qw.fmt!r} does not pack each table row on its own, so rows "
                         f"cannot be gathered; use one of {', '.join(ROW_PACKED_FORMATS)}")
    n = qw.shape[0]
    need = {"qweight", "scales"} | ({"mins"} if FORMATS[qw.fmt].affine else set())
    missing = need - set(qw.tensors)
    if missing:
        raise ValueError(f"QuantEmbedding: {qw.fmt} table lacks packed tensors {sorted(missing)}")
    for name, t in qw.tensors.items():
        if t.dim() < 1 or t.shape[0] != n:
            raise ValueError(f"QuantEmbedding: packed tensor {name!r} has shape {tuple(t.shape)}, not one row per "
                             f"token ({n} rows): a layout that packs across rows cannot be gathered")


class QuantEmbedding(PackedWeightViews, nn.Module):
    """``table[ids]`` with ``table`` (``[num_embeddings, embedding_dim]``) stored packed.

    Output: fp32 by default (exactly ``dequantize(table)[ids]``); after a dtype cast of the model
    (``model.to(torch.bfloat16)``) the rows are returned in that dtype, like a cast ``nn.Embedding``
    would, while the packed tensors keep their dtypes (they are part of the format).
    """

    def __init__(self, qw: QuantizedWeight | None = None, *, source: nn.Module | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if (qw is None) == (source is None):
            raise ValueError("QuantEmbedding needs a QuantizedWeight or a source QuantLinear (one of them)")
        if source is not None:
            qw = source.qweight_packed
        _check_row_packed(qw)
        self.fmt = qw.fmt
        self.group_size = int(qw.group_size)
        self.num_embeddings, self.embedding_dim = (int(s) for s in qw.shape)
        self.padding_idx = None  # nn.Embedding compatibility
        self.out_dtype = dtype
        # the tied head: kept out of _modules (not a child: listed and saved once, as lm_head)
        self.__dict__["source"] = source
        if source is None:
            for name, t in qw.tensors.items():
                self.register_buffer(name, t.contiguous())
            self._tensor_names = tuple(qw.tensors)
        else:
            self._tensor_names = tuple(source._tensor_names)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_embedding(cls, emb: nn.Embedding, fmt: str, group_size: int | None = 64,
                       scale_dtype: torch.dtype = torch.float16, search: bool | None = None) -> QuantEmbedding:
        """RTN-quantize an ``nn.Embedding`` table in ``fmt`` (groups of ``group_size`` along the hidden
        dim; per-channel / fixed-block formats ignore it, see ``formats.effective_group_size``)."""
        if fmt not in FORMATS:
            raise ValueError(f"QuantEmbedding: unknown format {fmt!r}; known: {', '.join(sorted(FORMATS))}")
        if fmt not in ROW_PACKED_FORMATS:
            raise ValueError(f"QuantEmbedding: format {fmt!r} cannot be gathered by rows")
        if emb.padding_idx is not None or emb.max_norm is not None or emb.sparse:
            raise ValueError("QuantEmbedding: padding_idx / max_norm / sparse embeddings are not supported")
        w = emb.weight.detach()
        effective_group_size(fmt, w.shape[1], group_size)  # ValueError for a bad group size
        qw = quantize(w, fmt, group_size, scale_dtype=scale_dtype, search=search)
        return cls(qw, dtype=w.dtype if w.is_floating_point() else torch.float32)

    @classmethod
    def from_packed(cls, fmt: str, group_size: int, num_embeddings: int, embedding_dim: int,
                    tensors: dict[str, torch.Tensor]) -> QuantEmbedding:
        """Rebuild from saved tensors (``qweight``, ``scales``, [``mins``])."""
        t = {k: tensors[k] for k in _PACKED_NAMES if k in tensors}
        return cls(QuantizedWeight(fmt, (int(num_embeddings), int(embedding_dim)), int(group_size), t))

    @classmethod
    def tied_to(cls, head: nn.Module, dtype: torch.dtype = torch.float32) -> QuantEmbedding:
        """An embedding sharing the packed tensors of ``head`` (a ``QuantLinear`` ``[vocab, hidden]``
        whose weight is the table, as a tied ``lm_head``). No copy is made."""
        from .linear import QuantLinear

        if not isinstance(head, QuantLinear):
            raise ValueError(f"QuantEmbedding.tied_to needs a QuantLinear, got {type(head).__name__}")
        return cls(source=head, dtype=dtype)

    # -- views (qweight_packed, bits_per_weight, weight = the table: see PackedWeightViews) ------
    @property
    def tied(self) -> bool:
        return self.__dict__["source"] is not None

    @property
    def _packed_shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    def _packed(self) -> dict[str, torch.Tensor]:
        src = self.__dict__["source"]
        owner = self if src is None else src
        return {k: getattr(owner, k) for k in self._tensor_names}

    def __getattr__(self, name: str):
        # qweight / scales / mins of a tied embedding are the head's tensors
        if name in _PACKED_NAMES:
            src = self.__dict__.get("source")
            if src is not None and name in self.__dict__.get("_tensor_names", ()):
                return getattr(src, name)
        return super().__getattr__(name)

    def packed_state(self) -> dict[str, torch.Tensor]:
        """The packed tensors (for a tied embedding: the head's, which a checkpoint stores once)."""
        return self._packed()

    # -- forward -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        k = self.embedding_dim
        if flat.numel() == 0:
            return torch.empty(*input_ids.shape, k, dtype=self.out_dtype, device=input_ids.device)
        if flat.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"QuantEmbedding: input ids must be int64 or int32, got {flat.dtype}")
        packed = self._packed()
        n = self.num_embeddings
        if not bool(((flat >= 0) & (flat < n)).all()):
            bad = flat[(flat < 0) | (flat >= n)][0].item()
            raise IndexError(f"QuantEmbedding: token id {bad} is out of range [0, {n})")
        rows = {name: t.index_select(0, flat) for name, t in packed.items()}
        out = dequantize(QuantizedWeight(self.fmt, (flat.numel(), k), self.group_size, rows))
        out = out.reshape(*input_ids.shape, k)
        return out if out.dtype == self.out_dtype else out.to(self.out_dtype)

    # -- module plumbing -----------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """Device moves apply to owned packed tensors (dtypes are kept: part of the format); a dtype
        cast of the model sets the output dtype. A tied embedding owns nothing: its head moves."""
        probe = fn(torch.zeros(1, dtype=torch.float32))
        if probe.is_floating_point():
            self.out_dtype = probe.dtype
        if self.__dict__["source"] is None:
            for name in self._tensor_names:
                t = self._buffers[name]
                nt = fn(t)
                if nt.dtype != t.dtype:
                    nt = t.to(device=nt.device)
                self._buffers[name] = nt
        return self

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, fmt={self.fmt}, group_size={self.group_size}, "
                f"tied={self.tied}, bpw={self.bits_per_weight:.3f}")
