"""Calibration and held-out text for quantization, shipped with Python itself.

The text is ``pydoc_data.topics.topics`` (the 79 help topics of the language reference, the same
corpus as the ``ppl`` eval suite, see :mod:`llmopt.tasks.ppl`). The topic *names* are split
deterministically, independent of the Python hash seed, by the parity of the first byte of
``sha256(name)``: even -> calibration, odd -> held-out (39 / 40 topics on CPython 3.12). GPTQ and
AWQ calibrate on :func:`calibration_batches`; quantization quality reports score perplexity on
:func:`heldout_texts` only, so a method is never scored on the text it was fitted to.

Topics quote each other: ``compound`` contains the whole of ``if``, ``else`` and ``while``,
``typesseq`` most of ``typesseq-mutable``, ``specialnames`` a third of its paragraphs elsewhere.
So the held-out texts are deduplicated by paragraph: a held-out paragraph that also stands
(whitespace-normalized) in any calibration topic is dropped, and a topic left with nothing is
dropped (:func:`heldout_texts`). No held-out paragraph is ever seen by calibration.

Note: ``llmopt eval --suite ppl`` samples from *all* topics (``random.Random(seed).sample`` over
every name), so its numbers mix calibration and held-out topics; use :func:`perplexity` on
:func:`heldout_texts` to compare quantization methods.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "is_calibration_topic",
    "calibration_names",
    "heldout_names",
    "calibration_texts",
    "heldout_texts",
    "paragraphs",
    "calibration_batches",
    "score_texts",
    "score_token_ids",
    "heldout_token_ids",
    "perplexity",
]


def load_topics() -> dict[str, str]:
    """The help topics of this Python's language reference, by name (the ``ppl`` suite's corpus;
    read here too because quant sits below the eval harness and must not import it)."""
    from pydoc_data.topics import topics

    return dict(topics)


def is_calibration_topic(name: str) -> bool:
    """True for topics in the calibration part (even first byte of ``sha256(name)``)."""
    return hashlib.sha256(name.encode("utf-8")).digest()[0] % 2 == 0


def calibration_names() -> list[str]:
    """Sorted names of the calibration topics."""
    return [n for n in sorted(load_topics()) if is_calibration_topic(n)]


def heldout_names() -> list[str]:
    """Sorted names of the held-out topics (disjoint from :func:`calibration_names`)."""
    return [n for n in sorted(load_topics()) if not is_calibration_topic(n)]


def calibration_texts() -> list[str]:
    """Texts of the calibration topics, in sorted-name order."""
    topics = load_topics()
    return [topics[n] for n in calibration_names()]


def paragraphs(text: str) -> list[str]:
    """The paragraphs of ``text`` (split at blank lines), each whitespace-normalized."""
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def heldout_texts() -> list[str]:
    """Texts of the held-out topics in sorted-name order, without any paragraph that also stands in
    a calibration topic (see the module docstring); topics left empty are dropped."""
    topics = load_topics()
    seen = {p for n in calibration_names() for p in paragraphs(topics[n])}
    out = []
    for n in heldout_names():
        kept = [p for p in re.split(r"\n\s*\n", topics[n]) if p.strip() and " ".join(p.split()) not in seen]
        if kept:
            out.append("\n\n".join(kept))
    return out


def calibration_batches(tokenizer: Any, n_seqs: int = 32, seq_len: int = 512, seed: int = 0) -> list[list[int]]:
    """``n_seqs`` token-id sequences of exactly ``seq_len`` tokens from the calibration topics.

    Every calibration topic is encoded with ``tokenizer.encode(text)`` (so with the tokenizer's
    own special tokens, e.g. a BOS, as perplexity scoring does), the encodings are concatenated
    in sorted-name order and cut into non-overlapping windows of ``seq_len``; ``n_seqs`` windows
    are drawn with ``random.Random(seed).sample`` and returned in stream order.
    """
    if n_seqs < 1 or seq_len < 2:
        raise ValueError(f"calibration_batches needs n_seqs >= 1 and seq_len >= 2, got {n_seqs}, {seq_len}")
    stream: list[int] = []
    for text in calibration_texts():
        stream.extend(int(t) for t in tokenizer.encode(text))
    n_windows = len(stream) // seq_len
    if n_seqs > n_windows:
        raise ValueError(f"the calibration topics give {len(stream)} tokens = {n_windows} windows of "
                         f"{seq_len}: ask for at most {n_windows} sequences or use a shorter seq_len")
    chosen = sorted(random.Random(seed).sample(range(n_windows), n_seqs))
    return [stream[i * seq_len:(i + 1) * seq_len] for i in chosen]


def _token_logprobs(model: torch.nn.Module, token_ids: Sequence[int]) -> torch.Tensor:
    """log p of every token after the first, with the runner's scoring semantics: one causal
    forward without cache."""
    p = next(model.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=dev)
    with torch.inference_mode():
        hidden = model(ids, torch.arange(len(ids), device=dev))
        logp = torch.log_softmax(model.compute_logits(hidden[:-1]).float(), -1)
        return logp.gather(1, ids[1:, None])[:, 0].cpu()


def heldout_token_ids(tokenizer: Any, max_tokens: int = 512) -> list[list[int]]:
    """The held-out texts encoded as :func:`score_texts` scores them (each cut to its first
    ``max_tokens`` tokens): the ids other systems (``llmopt bench``'s peers) score for the same number."""
    return [list(tokenizer.encode(text))[:max_tokens] for text in heldout_texts()]


def score_token_ids(model: torch.nn.Module, id_lists: Sequence[Sequence[int]],
                    logprobs: Callable[[Any, Sequence[int]], torch.Tensor] | None = None) -> tuple[float, int]:
    """``(sum of negative log-likelihoods, scored tokens)`` over token id lists: ``logprobs(model, ids)``
    gives log p of every token after the first (default: our ``Transformer``, one causal forward;
    ``llmopt bench`` passes transformers' forward for its baseline)."""
    score = _token_logprobs if logprobs is None else logprobs
    nll, n = 0.0, 0
    for ids in id_lists:
        if len(ids) < 2:
            raise ValueError(f"text encodes to {len(ids)} tokens: perplexity needs at least 2")
        nll += -float(score(model, ids).double().sum())
        n += len(ids) - 1
    return nll, n


def score_texts(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str],
                max_tokens: int = 512) -> tuple[float, int]:
    """``(sum of negative log-likelihoods, scored tokens)`` over ``texts``; each text is cut to
    its first ``max_tokens`` tokens and scored like :func:`llmopt.tasks.ppl.score_text`."""
    if not texts:
        raise ValueError("perplexity needs at least one text")
    return score_token_ids(model, [list(tokenizer.encode(text))[:max_tokens] for text in texts])


def perplexity(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_tokens: int = 512) -> float:
    """Corpus perplexity ``exp(sum NLL / scored tokens)`` of our ``Transformer`` on ``texts``."""
    nll, n = score_texts(model, tokenizer, texts, max_tokens)
    return math.exp(nll / n)
