"""The ``ppl`` suite: perplexity on English text that ships with Python itself.

The text is ``pydoc_data.topics.topics``: the 79 help topics of the Python language reference
(``help("if")`` and so on), plain English prose with some grammar and code. It is in every
CPython install, needs no download, and no small chat model is tuned on it in this form. The
text depends on the Python version, which run records therefore include.

Items are a seeded sample of topics (``random.Random(seed).sample`` over the sorted topic
names). Each topic is encoded with the model's tokenizer and cut to its first ``max_tokens``
tokens; every token after the first is scored with ``LLM.score``. The corpus perplexity is
``exp(sum of negative log-likelihoods / number of scored tokens)`` over all items, and its
interval is a bootstrap over topics.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from typing import Any

from .base import Item

SOURCE = "pydoc_data.topics"


def load_topics() -> dict[str, str]:
    """The help topics of this Python's language reference, by name."""
    from pydoc_data.topics import topics

    return dict(topics)


def source_description() -> str:
    v = sys.version_info
    return f"{SOURCE} (Python {v.major}.{v.minor}.{v.micro})"


class PerplexitySuite:
    name = "ppl"

    def items(self, n: int, seed: int, shots: int = 0) -> list[Item]:
        topics = load_topics()
        names = sorted(topics)
        if n > len(names):
            raise ValueError(f"{SOURCE} has {len(names)} topics: n={n} is too many")
        chosen = random.Random(seed).sample(names, n)
        return [
            Item(suite=self.name, id=f"ppl/{name}", task="pydoc_topics", messages=[],
                 reference="", text=topics[name])
            for name in chosen
        ]


@dataclass(frozen=True)
class ScoredText:
    nll_sum: float  # sum of -log p over scored tokens
    tokens: int  # number of scored tokens (encoded length - 1)
    latency_s: float


def score_text(llm: Any, text: str, max_tokens: int) -> ScoredText:
    """Negative log-likelihood of ``text`` (first ``max_tokens`` tokens) under ``llm``."""
    ids = list(llm.tokenizer.encode(text))[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"text encodes to {len(ids)} tokens: perplexity needs at least 2")
    start = time.perf_counter()
    logprobs = llm.score(ids)
    elapsed = time.perf_counter() - start
    if len(logprobs) != len(ids) - 1:
        raise ValueError(f"LLM.score returned {len(logprobs)} log-probs for {len(ids)} ids")
    return ScoredText(nll_sum=-float(logprobs.double().sum()), tokens=len(ids) - 1,
                      latency_s=elapsed)
