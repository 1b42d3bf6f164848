"""Ops for choosing which KV rows to keep: SnapKV's observation-window votes (torch) and H2O's
attention mass per decode row (native: ``csrc/fused.cpp`` / ``csrc/kv_int8.cpp`` ``attention_mass``,
else a torch reference).

Used by the attention layer (the end of a prefill, h2o rows) and by ``llmopt.engine.kv_policy``.
"""

from __future__ import annotations

import torch

from llmopt.kernels import kv_quant, ops
from llmopt.kernels.build import native_enabled

__all__ = ["attention_mass", "attention_mass_ref", "observation_scores", "paged_keys"]


def observation_scores(q_obs: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """SnapKV's votes: ``q_obs`` [W, Hq, D] are the last W queries of a context whose keys are
    ``keys`` [C, Hk, D] (rope applied). Returns float32 [Hk, C]: the causal softmax attention of
    every window query, summed over the window and over the query heads that share a kv head."""
    W, Hq, D = q_obs.shape
    C, Hk, _ = keys.shape
    G = Hq // Hk
    q = q_obs.float().permute(1, 0, 2).reshape(Hk, G * W, D)  # head h*G+g -> kv head h
    k = keys.float().permute(1, 2, 0)  # [Hk, D, C]
    s = torch.bmm(q, k) * scale  # [Hk, G*W, C]
    qpos = (torch.arange(W) + (C - W)).repeat(G)  # row g*W+j is query position C-W+j
    s = s.masked_fill(torch.arange(C)[None, :] > qpos[:, None], float("-inf"))
    return torch.softmax(s, dim=-1).sum(1)


def paged_keys(k_cache: torch.Tensor, k_scale: torch.Tensor | None, block_table: torch.Tensor, n: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The first ``n`` K rows of one sequence, ``[n, Hk, D]`` in ``dtype``, read back from the paged
    cache ``k_cache`` [num_blocks, block_size, Hk, D] through its ``block_table`` (dequantized with
    ``k_scale`` [num_blocks, block_size, Hk] from an 8-bit cache): the keys SnapKV's window and
    :func:`attention_mass_ref` score against."""
    _, bs, hk, d = k_cache.shape
    blocks = block_table[: (n + bs - 1) // bs].long()
    keys = k_cache[blocks].reshape(-1, hk, d)[:n]
    if not kv_quant.is_quantized(k_cache.dtype):
        return keys.to(dtype)
    if k_scale is None:
        raise ValueError("an 8-bit KV cache needs its scales")
    return kv_quant.dequantize_kv(keys, k_scale[blocks].reshape(-1, hk)[:n], dtype)


def attention_mass_ref(q: torch.Tensor, k_cache: torch.Tensor, k_scale: torch.Tensor | None,
                       block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`attention_mass` in torch: each row's keys gathered (dequantized from an 8-bit cache) and
    scored by :func:`observation_scores` with a one-query window."""
    lens = [int(x) for x in context_lens]
    out = torch.zeros(q.shape[0], k_cache.shape[2], max(lens, default=0))
    for b, L in enumerate(lens):
        if L:
            out[b, :, :L] = observation_scores(q[b:b + 1], paged_keys(k_cache, k_scale, block_tables[b], L), scale)
    return out


def attention_mass(q: torch.Tensor, k_cache: torch.Tensor, k_scale: torch.Tensor | None,
                   block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """H2O's attention mass: ``q`` [B, Hq, D] (one query per row, rope applied) against the first
    ``context_lens[b]`` rows of a paged cache (``block_tables`` [B, max_blocks]; an 8-bit cache with
    its ``k_scale``). Returns float32 [B, Hk, max(context_lens)]: per kv head the softmax
    probabilities of the group's query heads summed (each row's Hq / Hk heads sum to Hq / Hk; zeros
    past a row's context). Each row's numbers depend only on that row (batch invariant)."""
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    qf = q.float().contiguous()
    if native_enabled() and q.device.type == "cpu" and not q.requires_grad and q.dim() == 3:
        if k_scale is None and k_cache.dtype == torch.float32 and k_cache.stride(-1) == 1:
            ext = ops._native()
            if ext is not None and hasattr(ext, "attention_mass"):
                return ext.attention_mass(qf, k_cache, tables, lens, float(scale))
        elif k_scale is not None and kv_quant.is_quantized(k_cache.dtype) and k_cache.is_contiguous():
            ext = kv_quant._native()
            if ext is not None and hasattr(ext, "attention_mass_int8"):
                return ext.attention_mass_int8(qf, k_cache, k_scale.contiguous(), tables, lens, float(scale))
    return attention_mass_ref(q, k_cache, k_scale, tables, lens, scale)
