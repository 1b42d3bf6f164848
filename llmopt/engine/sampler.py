"""Token selection: greedy, or temperature / top-k / top-p sampling with a per-sequence RNG (so a
seeded request samples the same tokens whatever else is in the batch), plus top-n logprobs."""

from __future__ import annotations

import torch

from llmopt.engine.sequence import Sequence, TokenLogprob


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


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [S, V] float32, one row per sequence -> next token per sequence (+ logprobs if asked)."""
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
            lps[i] = TokenLogprob(
                tokens[i], float(logp[j, tokens[i]]),
                list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else [])
    return tokens, lps
