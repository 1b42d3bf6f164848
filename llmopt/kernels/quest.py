"""Quest-style sparse decode attention (Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient
Long-Context LLM Inference"): every K/V row stays in the paged cache; each decode query reads only
the cache blocks whose keys can score high for it.

Per-block key summaries: ``kmin`` / ``kmax`` float32 ``[num_blocks, Hk, D]`` per layer, the
elementwise min and max of the K rows a block holds for each kv head (an int8 cache: of the
dequantized rows, what attention reads). :func:`update_summaries` folds rows in as they are
written; a row at offset 0 of its block resets the block's summary (a reused block forgets its old
owner). Min and max are order-independent, so the summaries are deterministic.

Selection per (decode row, kv head): block j's score is the largest over the G query heads of the
group of ``sum_d (q_gd * c_jd + RADIUS * |q_gd| * r_jd)``, with ``c = (kmin + kmax) / 2`` the block's
centre and ``r = (kmax - kmin) / 2`` its radius. ``RADIUS = 1`` is Quest's upper bound of
``q_g . k`` over the block's keys; that bound assumes one key at the favourable end of all D ranges
at once, so wide blocks of unrelated text outranked the narrow block holding the key a copy head
reads (passkey at 4k context); 0.5 keeps more of the attention mass (docs/long_context.md 2b). A
block ranks by its most interested head (summing the heads' scores let the heads that look
elsewhere outvote a copy head, and lost needle digits); the first block (attention sinks) and the
last (the current token's) are always read, plus the best ``k - 2`` others (ties: the lower index). ``k`` (``topk``, per row) of 0 or at least the row's block count
reads every block: the dense kernel's result bit for bit. One block set per kv head, so each K/V
row is loaded once for the group.

Pins (``kv_quest_pin``, engine/kv_policy.py): at the end of a prefill, each (layer, kv head) pins
the blocks the prompt's observation window voted for (SnapKV's scores, :func:`quest_pins`); a pinned
block ranks before every unpinned one, so it is read at every decode step while the ``k - 2`` places
can hold it, inside the same budget. Pins are indices into the sequence's own block table (passed per
step, uint8 ``[rows, Hk, max_blocks]``), so a block shared through the prefix cache or reused by
another sequence is never pinned for a sequence that did not vote for it. No pins: the plain choice.

The native kernels (``csrc/quest.cpp`` over ``csrc/quest.h``, shared with the fused decode step)
run when they built; the ``*_ref`` twins are torch and define the semantics. ``LLMOPT_NATIVE=0``
forces the references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .build import extension_loader, native_enabled
from .kv_quant import dequantize_kv

__all__ = ["RADIUS", "update_summaries", "update_summaries_ref", "quest_select", "quest_select_ref",
           "quest_decode_attention", "quest_decode_attention_ref", "native_available", "quest_pins"]

_native = extension_loader("llmopt_quest", ["quest.cpp"])

RADIUS = 0.5  # weight of a block's key radius in its score (csrc/quest.h kRadius; 1: Quest's upper bound)


def native_available() -> bool:
    return native_enabled() and _native() is not None


def _ext():
    return _native() if native_enabled() else None


def _pins(pins: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """``pins`` as the native kernels take them: contiguous uint8 [B, Hk, width] (None stays None)."""
    if pins is None:
        return None
    p = pins.to(torch.uint8)[..., :width]
    return F.pad(p, (0, width - p.shape[-1])).contiguous()


def update_summaries_ref(kmin: torch.Tensor, kmax: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                         block_size: int) -> None:
    """``rows`` [T, Hk, D] were written at flat cache ``slots`` [T]: rows at offset 0 reset their
    block's summary, then every row widens its block's min / max (in place on ``kmin`` / ``kmax``)."""
    rows = rows.float()
    blocks = slots.long() // block_size
    first = slots.long() % block_size == 0
    if bool(first.any()):
        kmin.index_copy_(0, blocks[first], rows[first])
        kmax.index_copy_(0, blocks[first], rows[first])
    idx = blocks[:, None, None].expand_as(rows)
    kmin.scatter_reduce_(0, idx, rows, "amin")
    kmax.scatter_reduce_(0, idx, rows, "amax")


def update_summaries(kmin: torch.Tensor, kmax: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
                     block_size: int) -> None:
    """Fold the K rows just written into the block summaries; see :func:`update_summaries_ref`."""
    ext = _ext()
    if ext is not None and rows.device.type == "cpu" and kmin.is_contiguous() and kmax.is_contiguous():
        ext.quest_update_(kmin, kmax, rows.float().contiguous(), slots.long().contiguous(), int(block_size))
        return
    update_summaries_ref(kmin, kmax, rows, slots, block_size)


def quest_pins(scores: torch.Tensor, n_pin: int, block_size: int, window: int, pool: int) -> torch.Tensor:
    """The blocks one layer's kv heads pin: ``scores`` [Hk, C] are the prompt's observation-window
    votes (SnapKV's, ``kv_select.observation_scores``) over its C rows. As SnapKV ranks rows, the rows
    before the last ``window`` are max-pooled over ``pool`` neighbours among themselves; a block's
    vote is its best such row (the window's own rows and the first block, which Quest always reads,
    vote for nothing). Returns uint8 [Hk, ceil(C / block_size)]: 1 on each head's ``n_pin`` best-voted
    blocks (ties: the lower block; never a block without a voting row)."""
    Hk, C = scores.shape
    nb = (C + block_size - 1) // block_size
    out = torch.zeros(Hk, nb, dtype=torch.uint8)
    prefix = C - window
    if n_pin <= 0 or prefix <= block_size:
        return out
    s = scores[:, :prefix].float()
    if pool > 1:
        s = F.max_pool1d(s[:, None, :], pool, stride=1, padding=pool // 2)[:, 0, :prefix]
    s = F.pad(s, (0, nb * block_size - prefix), value=float("-inf")).reshape(Hk, nb, block_size).amax(-1)
    s[:, 0] = float("-inf")
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :n_pin]
    ok = torch.gather(s, 1, order) > float("-inf")
    out.scatter_(1, order, ok.to(torch.uint8))
    return out


def quest_select_ref(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, topk: torch.Tensor, block_size: int,
                     scale: float, radius: float = RADIUS, pins: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B, Hk, max_blocks]: the blocks each (row, kv head) reads (see the module docstring).
    The scores use ``q * scale`` (what the kernel scores with); ``radius``: the block radius' weight
    (the kernel's is :data:`RADIUS`; other values compare rules, benchmarks/quest_recall.py).
    ``pins`` (uint8 / bool [B, Hk, >= max_blocks] or None): pinned blocks rank before every unpinned
    one (among themselves by score), so they are read whenever the ``k - 2`` free places hold them."""
    B, Hq, D = q.shape
    Hk = kmin.shape[1]
    G = Hq // Hk
    MB = block_tables.shape[1]
    out = torch.zeros(B, Hk, MB, dtype=torch.bool)
    qs = (q.float() * scale).reshape(B, Hk, G, D)
    for b in range(B):
        nb = (int(context_lens[b]) + block_size - 1) // block_size
        k = int(topk[b])
        if k <= 0 or k >= nb:
            out[b, :, :nb] = True
            continue
        k = max(k, 2)
        blocks = block_tables[b, :nb].long()
        mn, mx = kmin[blocks].transpose(0, 1), kmax[blocks].transpose(0, 1)  # [Hk, nb, D]
        qb = qs[b][:, :, None, :]  # [Hk, G, 1, D]
        lo, hi = qb * mn[:, None], qb * mx[:, None]  # q c + R |q| r == (1+R)/2 max(lo, hi) + (1-R)/2 min(lo, hi)
        part = 0.5 * (1.0 + radius) * torch.maximum(lo, hi) + 0.5 * (1.0 - radius) * torch.minimum(lo, hi)
        score = part.sum(dim=3).amax(dim=1)  # [Hk, nb]
        mid = score[:, 1:nb - 1]
        order = torch.sort(mid, dim=1, descending=True, stable=True).indices
        if pins is not None:  # pinned first, each part still in score order (a stable sort of the order)
            pinned = pins[b, :, 1:nb - 1].bool().gather(1, order)
            order = order.gather(1, torch.sort(pinned.to(torch.uint8), dim=1, descending=True, stable=True).indices)
        order = order[:, :k - 2] + 1
        out[b, :, 0] = True
        out[b, :, nb - 1] = True
        out[b].scatter_(1, order, True)
    return out


def quest_select(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, topk: torch.Tensor, block_size: int, scale: float,
                 pins: torch.Tensor | None = None) -> torch.Tensor:
    """As :func:`quest_select_ref`, by the native kernel's selection (what attention reads)."""
    ext = _ext()
    if ext is None:
        return quest_select_ref(q, kmin, kmax, block_tables, context_lens, topk, block_size, scale, pins=pins)
    idx = ext.quest_select(q.float().contiguous(), kmin, kmax, block_tables.to(torch.int32).contiguous(),
                           context_lens.to(torch.int32).contiguous(), topk.to(torch.int32).contiguous(),
                           int(block_size), float(scale), _pins(pins, block_tables.shape[1]))
    valid = idx >= 0
    hits = torch.zeros(idx.shape, dtype=torch.int32).scatter_add_(2, torch.where(valid, idx, 0).long(), valid.int())
    return hits > 0


def quest_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, kmin: torch.Tensor,
                               kmax: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                               topk: torch.Tensor, scale: float, pins: torch.Tensor | None = None) -> torch.Tensor:
    """One query per row [B, Hq, D] over the tokens of its chosen blocks (float cache, or int8 with
    its scales: dequantized), HF eager attention math. Returns [B, Hq, D]."""
    B, Hq, D = q.shape
    BS, Hk = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hk
    if k_scale is not None and v_scale is not None:
        used = torch.unique(block_tables.long().flatten())  # dequantize only the blocks the batch uses
        remap = torch.zeros(k_cache.shape[0], dtype=torch.long)
        remap[used] = torch.arange(len(used))
        chosen = quest_select_ref(q, kmin, kmax, block_tables, context_lens, topk, BS, scale, pins=pins)
        k_cache = dequantize_kv(k_cache[used], k_scale[used], q.dtype)
        v_cache = dequantize_kv(v_cache[used], v_scale[used], q.dtype)
        block_tables = remap[block_tables.long()]
    else:
        chosen = quest_select_ref(q, kmin, kmax, block_tables, context_lens, topk, BS, scale, pins=pins)
    lens = context_lens.long()
    L = int(lens.max()) if B else 0
    if L == 0:
        return q.new_zeros(B, Hq, D)
    t = torch.arange(L)
    valid = t[None, :] < lens[:, None]  # [B, L]
    blocks = torch.where(valid, block_tables.long()[:, t // BS], 0)
    k = k_cache[blocks, t % BS].permute(0, 2, 1, 3)  # [B, Hk, L, D]
    v = v_cache[blocks, t % BS].permute(0, 2, 1, 3)
    mask = valid[:, None, :] & torch.gather(chosen, 2, (t // BS).expand(B, Hk, L))  # [B, Hk, L]
    scores = torch.matmul(q.reshape(B, Hk, G, D), k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).nan_to_num(0.0).to(q.dtype)
    return torch.matmul(probs, v).reshape(B, Hq, D)


def quest_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, kmin: torch.Tensor,
                           kmax: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                           topk: torch.Tensor, scale: float, pins: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse paged decode attention; see :func:`quest_decode_attention_ref` and the module docstring.
    ``topk`` int [B]: blocks each row reads (0: all); ``pins`` uint8 [B, Hk, max_blocks] or None."""
    ext = _ext()
    if (ext is not None and q.device.type == "cpu" and q.dtype == torch.float32 and not q.requires_grad
            and q.dim() == 3 and k_cache.is_contiguous() and v_cache.is_contiguous()):
        return ext.quest_decode_attention(q.contiguous(), k_cache, v_cache, k_scale, v_scale, kmin, kmax,
                                          block_tables.to(torch.int32).contiguous(),
                                          context_lens.to(torch.int32).contiguous(),
                                          topk.to(torch.int32).contiguous(), float(scale),
                                          _pins(pins, block_tables.shape[1]))
    return quest_decode_attention_ref(q, k_cache, v_cache, k_scale, v_scale, kmin, kmax, block_tables, context_lens,
                                      topk, scale, pins)
