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

from llmopt.engine.sampling_params import SamplingParams
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
def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> list[int]:
    """One sampled token per row of ``logits`` [R, V] (overwritten) under ``params[j]``'s
    temperature / top-k / top-p, drawn with ``generators[j]`` (None: torch's default generator).

    All rows at once by inverse-CDF sampling, one uniform draw per row and step (a per-row
    ``torch.multinomial`` draws V exponentials per row: ~6% of a GRPO rollout's time at a 49k
    vocabulary). The row's distribution is ``softmax(filtered logits / T)``; its CDF is summed in
    float64 and the token is the first whose CDF exceeds ``u * total`` (``u`` in [0, 1)), so a
    token of probability 0 (filtered or masked) is never chosen. Each row depends only on its own
    logits and generator: a seeded request samples the same tokens whatever else is in the batch."""
    if logits.dim() != 2 or not len(params) == len(generators) == logits.shape[0]:
        raise ValueError(f"sample_rows: logits {tuple(logits.shape)} need one SamplingParams and one generator "
                         f"per row, got {len(params)} and {len(generators)}")
    x = logits
    x.div_(torch.tensor([p.temperature for p in params], dtype=x.dtype)[:, None])
    for j, p in enumerate(params):
        if p.top_k > 0 or p.top_p < 1.0:
            x[j] = _filter(x[j], p.top_k, p.top_p)
    cdf = torch.softmax(x, -1).double().cumsum_(-1)
    total = cdf[:, -1]
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    # u * total < total; rounding could land on it, which the largest double below total keeps out
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target[:, None], right=True)[:, 0].tolist()


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


_CHUNK = 512  # vocabulary chunk of greedy_rows' first pass


def greedy_rows(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(maximum, index of its first occurrence) per row of ``logits`` [R, V]: ``logits.max(-1)``'s answer.
    torch's CPU arg-max walks a row on one thread without vector reductions (0.65 ms for 16 x 49,152
    float32 logits, ~2.5% of a 16-stream decode step); here two vectorized passes find it: every chunk's
    maximum, then the first chunk holding the row's maximum, then its first index there (~0.1 ms). Rows with
    a NaN (torch's maximum), a single row, small vocabularies and other dtypes take ``max`` itself."""
    R, V = logits.shape
    n = V // _CHUNK * _CHUNK
    if logits.dtype != torch.float32 or n < 4 * _CHUNK or logits.stride(-1) != 1 or R < 2:
        best = logits.max(-1)
        return best.values, best.indices
    m = logits[:, :n].view(R, n // _CHUNK, _CHUNK).amax(-1)
    if n < V:
        m = torch.cat([m, logits[:, n:].amax(-1, keepdim=True)], 1)
    top = m.amax(-1)
    if bool(torch.isnan(top).any()):
        best = logits.max(-1)
        return best.values, best.indices
    first = (m == top[:, None]).to(torch.uint8).argmax(-1) * _CHUNK  # start of the first chunk holding it
    cols = (first[:, None] + torch.arange(_CHUNK)).clamp_(max=V - 1)  # the tail chunk repeats column V - 1
    within = (logits.gather(1, cols) == top[:, None]).to(torch.uint8).argmax(-1)
    return top, first + within


def needs_chosen_logprob(seq: Sequence) -> bool:
    """The chosen token's log-probability is needed to decide an exit: a low-confidence exit, or a think
    gate still counting (``ThinkTracker.gate_open``)."""
    return seq.params.low_confidence_exit is not None or seq.think.gate_open(seq.params.think_gate)


def sample(logits: torch.Tensor, seqs: list[Sequence],
           guided: GuidedDecoder | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [S, V] float32, one row per sequence -> next token per sequence (+ logprobs if asked, or the
    chosen token's alone for a sequence with ``low_confidence_exit`` or an open ``think_gate``).
    ``guided``: the engine's grammar side, needed when a sequence has a grammar (masks in place)."""
    if guided is not None:
        mask_guided(logits, seqs, guided)
    elif any(s.guided is not None for s in seqs):
        raise ValueError("a sequence has a grammar but sample() got no GuidedDecoder to mask with")
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
    tokens = [0] * len(seqs)
    if greedy:
        for i, tok in zip(greedy, greedy_rows(logits if len(greedy) == len(seqs) else logits[greedy])[1].tolist()):
            tokens[i] = tok
    if rows:
        picked = sample_rows(logits[rows], [seqs[i].params for i in rows], [seqs[i].generator for i in rows])
        for i, tok in zip(rows, picked):
            tokens[i] = tok
    lps: list[TokenLogprob | None] = [None] * len(seqs)
    # logprobs asked for, or the chosen token's for a low-confidence exit or an open think gate (TokenLogprob
    # with no top list)
    want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None or needs_chosen_logprob(s)]
    if want:
        logp = torch.log_softmax(logits if len(want) == len(seqs) else logits[want], -1)
        for j, i in enumerate(want):
            n = seqs[i].params.logprobs
            top = torch.topk(logp[j], n) if n else None
            pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            if seqs[i].guided is not None:  # fewer tokens allowed than asked for: no -inf entries
                pairs = [(t, v) for t, v in pairs if v != -math.inf]
            lps[i] = TokenLogprob(tokens[i], float(logp[j, tokens[i]]), pairs)
    return tokens, lps
