"""Token selection: greedy, or temperature / top-k / top-p sampling with a per-sequence RNG (so a
seeded request samples the same tokens whatever else is in the batch), plus top-n logprobs.

Guided rows (sequences with a grammar) first get their disallowed tokens set to -inf, all guided
rows of the step in one bitmask; everything after (greedy, temperature, top-k, top-p, logprobs)
sees the masked distribution. Logprobs of a guided sequence are therefore those of the
constrained distribution (the model's renormalized over the allowed tokens, what was actually
sampled from); tokens the grammar forbids never appear among the top-n."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch

from llmopt.engine.sequence import Sequence, TokenLogprob

if TYPE_CHECKING:
    from llmopt.engine.guided import GuidedDecoder


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] -> logits with everything outside top-k / top-p set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        cum = probs.cumsum(-1)
        remove = cum - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, idx, sorted_logits)
    return logits


@torch.inference_mode()
def mask_guided(logits: torch.Tensor, seqs: list[Sequence], decoder: GuidedDecoder) -> None:
    """Apply each guided sequence's grammar mask to its logits row, in place (time spent is added
    to ``decoder.seconds``)."""
    from llmopt.engine.guided import apply_bitmask

    rows = [i for i, s in enumerate(seqs) if s.guided is not None]
    if not rows:
        return
    t0 = time.perf_counter()
    states = [seqs[i].guided for i in rows]
    bitmask = decoder.fill_bitmask(states)  # type: ignore[arg-type]
    if len(rows) == len(seqs):
        apply_bitmask(logits, bitmask)
    else:
        idx = torch.tensor(rows)
        logits[idx] = apply_bitmask(logits[idx], bitmask)
    decoder.seconds += time.perf_counter() - t0


def sample(logits: torch.Tensor, seqs: list[Sequence],
           guided: GuidedDecoder | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [S, V] float32, one row per sequence -> next token per sequence (+ logprobs if asked).
    ``guided``: the engine's grammar side, needed when a sequence has a grammar (masks in place)."""
    if guided is not None:
        mask_guided(logits, seqs, guided)
    elif any(s.guided is not None for s in seqs):
        raise ValueError("a sequence has a grammar but sample() got no GuidedDecoder to mask with")
    tokens = logits.argmax(-1).tolist()
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        row = _filter(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = row.softmax(-1)
        tokens[i] = int(torch.multinomial(probs, 1, generator=seq.generator).item())
    lps: list[TokenLogprob | None] = [None] * len(seqs)
    want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if want:
        logp = torch.log_softmax(logits[want], -1)
        for j, i in enumerate(want):
            n = seqs[i].params.logprobs
            top = torch.topk(logp[j], n) if n else None
            pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            if seqs[i].guided is not None:  # fewer tokens allowed than asked for: no -inf entries
                pairs = [(t, v) for t, v in pairs if v != -math.inf]
            lps[i] = TokenLogprob(tokens[i], float(logp[j, tokens[i]]), pairs)
    return tokens, lps
