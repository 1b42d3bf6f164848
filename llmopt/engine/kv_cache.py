"""Paged KV cache bookkeeping: fixed-size blocks, per-sequence block tables, a free list, and a
prefix cache in which every *computed* full block is known by the chained hash of its token ids.

The tensors themselves live in the runner; this class only hands out block ids.
"""

from __future__ import annotations

from collections import OrderedDict

from llmopt.engine.sequence import Sequence


def block_hash(prev: int, tokens: tuple[int, ...]) -> int:
    return hash((prev, tokens))


def _caches_prefix(seq: Sequence) -> bool:
    """Whether the sequence takes and publishes prefix-cache blocks: not when a compression policy
    rewrites its blocks in place (Quest only reads fewer of them, so it does)."""
    return seq.kv_policy is None or seq.kv_policy.name == "quest"


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # Free blocks in LRU order; a freed block keeps its hash so a later prefix can revive it.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.prefix_hit_tokens = 0  # counters over the engine's life
        self.prefix_query_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _take_free(self) -> int:
        bid, _ = self.free.popitem(last=False)
        h = self.block_hash[bid]
        if h is not None and self.cached.get(h) == bid:
            del self.cached[h]
        self.block_hash[bid] = None
        self.ref_count[bid] = 1
        return bid

    def _hashes(self, seq: Sequence, n_blocks: int) -> list[int]:
        ids, bs = seq.token_ids, self.block_size
        while len(seq.block_hashes) < n_blocks:
            i = len(seq.block_hashes)
            prev = seq.block_hashes[-1] if i else 0
            seq.block_hashes.append(block_hash(prev, tuple(ids[i * bs:(i + 1) * bs])))
        return seq.block_hashes[:n_blocks]

    def admit(self, seq: Sequence, num_new_tokens: int) -> bool:
        """First allocation of a waiting sequence: reuse cached prefix blocks, then allocate the rest
        for ``num_computed + num_new_tokens`` tokens. Returns False (allocating nothing) if short."""
        assert not seq.block_table
        hits: list[int] = []
        if self.enable_prefix_caching and _caches_prefix(seq):
            # at least one token must be computed to get logits, so the last token is never a hit
            full = (len(seq) - 1) // self.block_size
            p = seq.kv_policy
            if p is not None and p.pin and not seq.kv_compressed:  # quest pins: the window's queries are computed
                full = min(full, max(0, len(seq) - p.window) // self.block_size)
            for h in self._hashes(seq, full):
                bid = self.cached.get(h)
                if bid is None:
                    break
                hits.append(bid)
        cached_tokens = len(hits) * self.block_size
        num_new_tokens = min(num_new_tokens, len(seq) - cached_tokens)
        need = self.blocks_needed(cached_tokens + num_new_tokens) - len(hits)
        revived = sum(1 for b in hits if self.ref_count[b] == 0)
        if need + revived > len(self.free):
            return False
        for bid in hits:
            if self.ref_count[bid] == 0:
                del self.free[bid]
            self.ref_count[bid] += 1
        seq.block_table = hits + [self._take_free() for _ in range(need)]
        seq.num_computed_tokens = cached_tokens
        seq.num_cached_tokens = cached_tokens
        seq.num_hashed_blocks = len(hits)
        self.prefix_hit_tokens += cached_tokens
        self.prefix_query_tokens += len(seq)
        return True

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_needed(seq.kv_len + num_new_tokens) - len(seq.block_table)
        return need <= len(self.free)

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        need = self.blocks_needed(seq.kv_len + num_new_tokens) - len(seq.block_table)
        for _ in range(max(0, need)):
            seq.block_table.append(self._take_free())

    def register_computed(self, seq: Sequence) -> None:
        """Publish the sequence's blocks whose K/V are now fully computed to the prefix cache."""
        if not self.enable_prefix_caching or not _caches_prefix(seq):
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_hashed_blocks:
            return
        hashes = self._hashes(seq, full)
        for i in range(seq.num_hashed_blocks, full):
            bid, h = seq.block_table[i], hashes[i]
            if h not in self.cached:
                self.cached[h] = bid
                self.block_hash[bid] = h
        seq.num_hashed_blocks = full

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (the K/V in the blocks were computed with weights that have
        changed since, e.g. a training step): later prompts compute their blocks anew. Blocks held
        by running sequences stay theirs, only no longer shared. Returns how many were forgotten."""
        n = len(self.cached)
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks
        return n

    def _release(self, blocks: list[int]) -> None:
        for bid in reversed(blocks):
            self.ref_count[bid] -= 1
            if self.ref_count[bid] == 0:
                self.free[bid] = None  # most recently freed last: evicted last

    def borrow(self, n: int) -> list[int] | None:
        """``n`` free blocks outside any sequence (scoring through the cache), or None if short."""
        if n > len(self.free):
            return None
        return [self._take_free() for _ in range(n)]

    def give_back(self, blocks: list[int]) -> None:
        self._release(blocks)

    def truncate(self, seq: Sequence, rows: int) -> None:
        """KV compression kept ``rows`` rows at the start of the table: free the blocks after them."""
        n = self.blocks_needed(rows)
        self._release(seq.block_table[n:])
        seq.block_table = seq.block_table[:n]

    def drop_leading(self, seq: Sequence, m: int) -> None:
        """KV compression evicted the first ``m`` blocks' worth of rows: free those blocks."""
        self._release(seq.block_table[:m])
        seq.block_table = seq.block_table[m:]

    def free_seq(self, seq: Sequence) -> None:
        self._release(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
        seq.num_evicted = 0
        seq.kv_compressed = False
        seq.quest_pins = None
