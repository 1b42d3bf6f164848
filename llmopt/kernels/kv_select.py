"""Torch ops for choosing which KV rows to keep (SnapKV's observation-window votes).

Used by the attention layer at the end of a prefill and by ``llmopt.engine.kv_policy``.
"""

from __future__ import annotations

import torch

__all__ = ["observation_scores"]


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
