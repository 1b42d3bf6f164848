"""Continuous batching: which sequences run in the next step and how many tokens each computes.

Policy, top to bottom: running sequences first (decodes take one token; a prompt being prefilled
in chunks takes what is left of the token budget), then waiting sequences in arrival order while
the budget, ``max_num_seqs`` and free KV blocks allow. When blocks run out, the most recently
admitted running sequence is preempted: its blocks are freed and it is recomputed later.

Early-exit probes (``Sequence.is_probe``) are admitted before waiting requests and outside
``max_num_seqs`` (their parent, paused meanwhile, holds its slot); a probe that does not fit the
free KV blocks is dropped at once (its parent thinks on) rather than wait for blocks its own
paused parent may be holding.
"""

from __future__ import annotations

import time
from collections import deque

from llmopt.config import EngineConfig
from llmopt.engine.kv_cache import BlockManager
from llmopt.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, cfg: EngineConfig, block_manager: BlockManager):
        self.cfg = cfg
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.draft_ids = []  # recomputed from its tokens later: no drafts in that prefill
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Returns ``[(seq, num_tokens_to_compute)]`` for this step."""
        budget = self.cfg.max_num_batched_tokens
        out: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq not in self.running or seq.paused:  # preempted below by an earlier sequence / probing
                continue
            if budget == 0:
                break
            n = self._chunk(seq, min(seq.num_to_compute, budget))
            if n == 0:
                continue
            while not self.bm.can_grow(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                continue
            self.bm.grow(seq, n)
            out.append((seq, n))
            budget -= n
        # probes first, then requests in arrival order; paused sequences wait for their probe
        for seq in sorted((s for s in self.waiting if not s.paused), key=lambda s: not s.is_probe):
            if budget <= 0 or (not seq.is_probe and self.num_running_requests >= self.cfg.max_num_seqs):
                break
            n = self._chunk(seq, min(seq.num_to_compute, budget))
            if n == 0:
                break
            if not self.bm.admit(seq, n):
                if seq.is_probe:
                    self.finish(seq, "dropped")  # the engine sees the parent unpaused, no decision
                    continue
                if not self.running and not out:
                    raise RuntimeError(f"the KV cache ({self.bm.num_blocks} blocks of {self.bm.block_size}) "
                                       f"cannot hold one sequence of {len(seq)} tokens; raise kv_cache_memory_gb")
                break
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.perf_counter()
            self.running.append(seq)
            n = min(n, seq.num_to_compute)  # prefix hits shrink the work
            out.append((seq, n))
            budget -= n
        return out

    @staticmethod
    def _chunk(seq: Sequence, n: int) -> int:
        """SnapKV, h2o and pinned Quest score the prompt with its last ``kv_window`` queries
        (``KVPolicy.observes``), so the prefill's last chunk must hold all of them: a chunk that would
        leave fewer than the window for the next step stops earlier (0: wait for a step with room for
        the whole window). Depends on the sequence alone, so a sequence is cut the same way in any
        batch it fits."""
        p = seq.kv_policy
        remaining = seq.num_to_compute
        if p is None or not p.observes or seq.kv_compressed or n >= remaining:
            return n
        if p.name == "snapkv" and p.tokens(len(seq)) is None:  # h2o scores even an uncompressed prompt
            return n
        window = min(p.window, len(seq))  # h2o observes a prompt shorter than the window whole
        if remaining - n < window:
            return max(0, remaining - window)
        return n

    @property
    def num_running_requests(self) -> int:
        return sum(1 for s in self.running if not s.is_probe)

    def add_probe(self, probe: Sequence) -> None:
        assert probe.probe_parent is not None and probe.probe_parent.think.probe is None
        probe.probe_parent.think.probe = probe
        self.waiting.appendleft(probe)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.metrics.finish_time = time.perf_counter()
        seq.kv_rows_at_finish = seq.kv_len
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:  # a paused parent preempted while its probe ran, or a probe
            self.waiting.remove(seq)
        self.bm.free_seq(seq)
        probe = seq.think.probe
        if probe is not None and not probe.finished:  # a parent that ends takes its probe along
            self.finish(probe, "abort")
        if seq.probe_parent is not None and reason in ("abort", "dropped"):
            seq.probe_parent.think.probe = None

    def abort(self, request_id: str) -> Sequence | None:
        for seq in list(self.running) + list(self.waiting):
            if seq.request_id == request_id:
                self.finish(seq, "abort")
                return seq
        return None
