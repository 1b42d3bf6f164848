"""KV compression policies that free real blocks of the paged cache.

A sequence's cache rows stop being "token t at row t": after compression row r holds whatever the
policy kept. That is sound because rotary embeddings are applied *before* K is cached, so a kept
key carries its true position; new tokens keep their true positions too (``Sequence.num_computed_tokens``
counts logical tokens, ``Sequence.num_evicted`` the rows dropped, and the runner writes token p to
row ``p - num_evicted``). Attention over the rows does not care about their order.

Policies (``EngineConfig.kv_policy`` engine-wide, ``SamplingParams.kv_policy`` per request):

- ``full``: nothing is evicted.
- ``streaming`` (StreamingLLM, Xiao et al. 2023): the first ``kv_sinks`` tokens (attention sinks)
  and the most recent tokens. At the end of the prefill and after every later step, whole blocks
  are dropped while the cache holds at least one block more than the budget, so a sequence keeps
  between ``budget`` and ``budget + block_size - 1`` rows. Dropping the oldest non-sink block
  costs a copy of the ``kv_sinks`` sink rows (``kv_sinks <= block_size``), nothing else.
- ``snapkv`` (SnapKV, Li et al. 2024): at the end of the prefill, the last ``kv_window`` prompt
  queries (the observation window) score every earlier position per layer and kv head (softmax
  attention summed over the window and the query heads of the group, then max-pooled over
  ``kv_pool`` neighbouring positions, as in the authors' LongBench configurations); each head keeps
  its ``budget - kv_window`` best positions plus the window. Exactly ``budget`` rows stay; the rest
  of the blocks are freed. Later tokens are appended (the cache grows again during decode, as in
  the paper).

  Why max-pooling over 15 positions (the paper's code offers avg or max, kernel 5-7): the window
  finds *where* the answer is (the question's words matched in the context), but decode reads the
  tokens *around* that spot, often in heads that never looked there during the window (copy heads
  that fire only once the answer has started). With average pooling over 7, a 5-digit passkey
  whose sentence the window hit lost its later digits in those heads and 4k passkey fell to 4/9;
  a max-pool keeps every row within ``kv_pool // 2`` of a hit at the hit's full score.
  docs/long_context.md has the measurements.
- ``h2o`` (H2O, Zhang et al. 2023): a budgeted eviction during decode. Each sequence keeps the first
  ``kv_sinks`` rows, the most recent ``kv_window`` rows and the "heavy hitters": the rows with the
  largest attention mass accumulated so far, per layer and kv head (softmax probabilities summed
  over the query heads of the group and over every query computed since the prefill). The mass
  starts from the prefill's SnapKV observation-window scores (max-pooled over ``kv_pool`` before the
  window, as SnapKV's), then every later query row adds its probabilities (``Sequence.kv_scores``,
  filled by the attention layer, ``models.transformer.MassSpan``). Like streaming, whenever the cache
  holds a block more than the budget, it is cut back to exactly ``budget`` rows (so between
  ``budget`` and ``budget + block_size - 1`` after every step); the kept rows keep their scores.
  The probabilities come from a native pass after each layer's attention (``csrc/fused_kernels.h``
  ``attention_mass_row``: the attention's own scores, then the exact softmax ``exp(s - m) / l``, not
  an estimate), run inside the fused one-call decode step (``csrc/decode.cpp``, ``mass=``) or, op by
  op, by ``kernels.kv_select.attention_mass`` (float32 and 8-bit caches; torch for bfloat16): the
  same bits on either path.

``kv_budget``: a float in (0, 1] is a fraction of the prompt (at least ``kv_sinks + 1`` tokens for
streaming, ``kv_window`` for snapkv, ``kv_sinks + kv_window + 1`` for h2o); an int is a token count (below those minimums: an error).
A budget not smaller than the prompt leaves the prompt uncompressed (documented no-op; streaming
still evicts once the sequence outgrows it during decode).

Limits: a compressed sequence neither takes nor publishes prefix-cache blocks (compaction rewrites
its blocks in place). A preempted compressed sequence is recomputed in full and compressed again
at the end of that recompute, so its later tokens can differ from an unpreempted run (the
uncompressed keys it now sees were computed over the full context). Models with sliding-window
layers are refused (their windows count rows, which no longer are positions).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmopt.config import KV_POLICIES, KVPolicy, check_kv_policy, parse_kv_budget
from llmopt.kernels.kv_select import observation_scores
from llmopt.kernels.quest import quest_pins

__all__ = ["KV_POLICIES", "KVCompressor", "KVPolicy", "check_kv_policy", "h2o_initial_scores", "h2o_keep",
           "observation_scores", "parse_kv_budget", "snapkv_keep"]

def snapkv_keep(scores: torch.Tensor, keep: int, window: int, pool: int) -> torch.Tensor:
    """Rows each kv head keeps: ``scores`` [Hk, C] -> int64 [Hk, keep], ascending; the last
    ``window`` rows always, plus the ``keep - window`` best earlier rows by max-pooled score (each
    row scored by the best of the ``pool`` rows centred on it, among the rows before the window;
    ties to the earlier row, so the choice is deterministic)."""
    Hk, C = scores.shape
    prefix = C - window
    k = keep - window
    if k < 0 or prefix < k:
        raise ValueError(f"cannot keep {keep} of {C} rows with a window of {window}")
    s = scores[:, :prefix]
    if pool < 1 or pool % 2 == 0:
        raise ValueError(f"pool must be an odd number >= 1, got {pool}")
    if pool > 1:
        s = F.max_pool1d(s[:, None, :], pool, stride=1, padding=pool // 2)[:, 0, :prefix]
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :k]
    win = torch.arange(prefix, C).expand(Hk, window)
    return torch.sort(torch.cat([order, win], dim=1), dim=1).values


def h2o_initial_scores(scores: torch.Tensor, window: int, pool: int) -> torch.Tensor:
    """H2O's starting mass from the prefill's observation scores ``scores`` [Hk, C]: rows before the
    last ``window`` max-pooled over ``pool`` neighbours among themselves (as :func:`snapkv_keep`
    ranks them), the window's rows as they are."""
    C = scores.shape[-1]
    prefix = max(0, C - window)
    out = scores.float().clone()
    if pool > 1 and prefix > 0:
        out[:, :prefix] = F.max_pool1d(scores[:, None, :prefix].float(), pool, stride=1, padding=pool // 2)[:, 0]
    return out


def h2o_keep(scores: torch.Tensor, keep: int, sinks: int, window: int) -> torch.Tensor:
    """Rows each (layer, kv head) keeps: ``scores`` [..., C] -> int64 [..., keep], ascending: the
    first ``sinks`` rows, the last ``window`` rows, and the ``keep - sinks - window`` rows between
    them with the largest accumulated attention mass (ties to the earlier row: deterministic)."""
    C = scores.shape[-1]
    heavy = keep - sinks - window
    if heavy < 0 or C < keep:
        raise ValueError(f"cannot keep {keep} of {C} rows with {sinks} sinks and a window of {window}")
    lead = scores.shape[:-1]
    mid = scores[..., sinks:C - window]
    order = torch.sort(mid, dim=-1, descending=True, stable=True).indices[..., :heavy] + sinks
    fixed = torch.cat([torch.arange(sinks), torch.arange(C - window, C)]).expand(*lead, sinks + window)
    return torch.sort(torch.cat([fixed, order], dim=-1), dim=-1).values


class KVCompressor:
    """Applies a sequence's policy after each engine step, rewriting rows of the runner's cache
    tensors (``caches``: every tensor laid out ``[layers, blocks, block_size, kv_heads, ...]``: K,
    V, and their scales when quantized) and freeing the emptied blocks in the block manager."""

    def __init__(self, caches: list[torch.Tensor], block_manager, block_size: int):
        self.caches = caches
        self.bm = block_manager
        self.block_size = block_size

    def after_step(self, seq, observed: list[torch.Tensor] | None) -> None:
        """``observed``: SnapKV scores per layer ([Hk, rows]) if this step ended the prefill."""
        policy: KVPolicy | None = seq.kv_policy
        if policy is not None and policy.pin and not seq.kv_compressed and seq.num_computed_tokens >= len(seq):
            seq.kv_compressed = True  # quest with pins: pin the blocks the prompt's window voted for, once
            seq.quest_pins = self._quest_pins(seq, observed, policy)
        if policy is None or policy.name == "quest" or seq.num_computed_tokens < len(seq):
            return  # full cache, quest (reads fewer rows, evicts none), or still prefilling
        if not seq.kv_compressed:
            seq.kv_compressed = True
            keep = policy.tokens(seq.kv_len)
            seq.kv_budget_rows = keep if keep is not None else (
                seq.kv_len if isinstance(policy.budget, float) else int(policy.budget))
            if policy.name == "snapkv" and keep is not None:
                if observed is None:
                    raise RuntimeError("SnapKV compression needs the observation scores of the prefill's last chunk")
                rows = torch.stack([snapkv_keep(s, keep, policy.window, policy.pool) for s in observed])
                self._keep_rows(seq, rows)
            if policy.name == "h2o":
                seq.kv_scores = self._h2o_start(seq, observed, policy)
        if policy.name == "h2o" and seq.kv_len - seq.kv_budget_rows >= self.block_size:
            assert seq.kv_scores is not None
            scores = seq.kv_scores[..., :seq.kv_len]
            rows = h2o_keep(scores, seq.kv_budget_rows, min(policy.sinks, seq.kv_len), policy.window)
            self._keep_rows(seq, rows)
            seq.kv_scores = scores.gather(-1, rows)  # the kept rows keep their mass, in their new order
        if policy.name == "streaming":
            excess = (seq.kv_len - seq.kv_budget_rows) // self.block_size
            if excess > 0:
                self._drop_blocks(seq, excess, policy.sinks)

    def _h2o_start(self, seq, observed: list[torch.Tensor] | None, policy: KVPolicy) -> torch.Tensor:
        """The accumulated mass at the end of the prefill: [layers, kv_heads, kv_len] float32."""
        if observed is None:  # a one-token prompt (no observation window): nothing observed yet
            if seq.kv_len > 1:
                raise RuntimeError("h2o needs the observation scores of the prefill's last chunk")
            shape = self.caches[0].shape
            return torch.zeros(shape[0], shape[3], seq.kv_len)
        return torch.stack([h2o_initial_scores(s, policy.window, policy.pool) for s in observed])

    def _quest_pins(self, seq, observed: list[torch.Tensor] | None, policy: KVPolicy) -> torch.Tensor | None:
        """Quest with pins: uint8 [layers, kv_heads, blocks] (block-table indices), each (layer, kv head)'s
        ``floor(pin * k)`` best-voted prompt blocks (``quest.quest_pins``), ``k`` the blocks a decode step
        reads at the end of the prefill (at most ``k - 2``: the first and the current block are read
        anyway); None when nothing is pinned (a prompt of no more than the window, a tiny budget)."""
        keep = policy.tokens(seq.kv_len + 1)  # the rows the first decode step reads (ModelRunner.quest_topk)
        if observed is None or keep is None:  # no window observed, or a budget that reads every block
            return None
        bs = self.block_size
        k = max(2, -(-keep // bs))
        n_pin = min(math.floor(policy.pin * k + 1e-9), k - 2)
        if n_pin <= 0:
            return None
        return torch.stack([quest_pins(s, n_pin, bs, min(policy.window, s.shape[-1]), policy.pool) for s in observed])

    def _slots(self, seq, rows: torch.Tensor) -> torch.Tensor:
        bt = torch.tensor(seq.block_table, dtype=torch.long)
        return bt[rows // self.block_size] * self.block_size + rows % self.block_size

    def _keep_rows(self, seq, rows: torch.Tensor) -> None:
        """Rows ``rows`` [layers, kv_heads, K] (ascending per head) move to rows 0..K-1; blocks
        past K are freed."""
        L, Hk, K = rows.shape
        src = self._slots(seq, rows)
        dst = self._slots(seq, torch.arange(K)).expand(L, Hk, K)
        li = torch.arange(L)[:, None, None]
        hi = torch.arange(Hk)[None, :, None]
        for cache in self.caches:
            flat = cache.view(L, -1, *cache.shape[3:])
            flat[li, dst, hi] = flat[li, src, hi]  # the gather copies before the scatter writes
        self.bm.truncate(seq, K)
        seq.num_evicted += seq.kv_len - K

    def _drop_blocks(self, seq, m: int, sinks: int) -> None:
        """Evict rows [sinks, sinks + m * block_size): copy the sink rows to the start of block m
        (whose first rows are evicted ones), then drop the first m blocks."""
        first, new_first = seq.block_table[0], seq.block_table[m]
        for cache in self.caches:
            cache[:, new_first, :sinks] = cache[:, first, :sinks]
        self.bm.drop_leading(seq, m)
        seq.num_evicted += m * self.block_size
