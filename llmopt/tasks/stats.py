"""Confidence intervals and paired comparisons for evaluation metrics. Pure functions.

- A proportion (accuracy, format rate) gets a Wilson score interval: unlike the normal
  approximation it stays inside [0, 1] and is sensible at 0/n and n/n.
- A mean of bounded scores, a perplexity or a pass@k gets a percentile bootstrap over items
  with a fixed seed, so the same run always reports the same interval.
- Two configurations on the same items are compared pairwise: a paired bootstrap of the delta
  (resampling items, keeping each item's pair together), plus McNemar's exact test for binary
  outcomes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054
N_BOOT = 2000


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n == 0."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} is outside 0..n={n}")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def _percentile_interval(stats: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


def bootstrap_ci(
    values: Sequence[float],
    stat: Callable[[np.ndarray], float] | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` (default: the mean) over items."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    if stat is None:
        boots = x[idx].mean(axis=1)
    else:
        boots = np.array([stat(x[row]) for row in idx])
    return _percentile_interval(boots)


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """exp(total negative log-likelihood / total scored tokens)."""
    total = float(np.sum(token_counts))
    if total <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(float(np.sum(nll_sums)) / total)


def perplexity_ci(
    nll_sums: Sequence[float], token_counts: Sequence[int], n_boot: int = N_BOOT, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap interval of the corpus perplexity, resampling whole documents."""
    nll = np.asarray(nll_sums, dtype=np.float64)
    cnt = np.asarray(token_counts, dtype=np.float64)
    if nll.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, nll.size, size=(n_boot, nll.size))
    boots = np.exp(nll[idx].sum(axis=1) / np.maximum(cnt[idx].sum(axis=1), 1.0))
    return _percentile_interval(boots)


def paired_bootstrap_delta(
    candidate: Sequence[float],
    baseline: Sequence[float],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """Mean(candidate - baseline) over paired items and its percentile bootstrap interval."""
    a = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired metrics need the same items: {a.shape} vs {b.shape}")
    d = a - b
    if d.size == 0:
        return (math.nan, (math.nan, math.nan))
    return (float(d.mean()), bootstrap_ci(d, n_boot=n_boot, seed=seed))


def paired_bootstrap_ppl_delta(
    cand_nll: Sequence[float],
    base_nll: Sequence[float],
    token_counts: Sequence[int],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """ppl(candidate) - ppl(baseline) on the same documents, with a paired bootstrap interval."""
    a = np.asarray(cand_nll, dtype=np.float64)
    b = np.asarray(base_nll, dtype=np.float64)
    c = np.asarray(token_counts, dtype=np.float64)
    if not (a.shape == b.shape == c.shape):
        raise ValueError("paired perplexity needs the same documents in both runs")
    if a.size == 0:
        return (math.nan, (math.nan, math.nan))
    delta = math.exp(a.sum() / c.sum()) - math.exp(b.sum() / c.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    cs = np.maximum(c[idx].sum(axis=1), 1.0)
    boots = np.exp(a[idx].sum(axis=1) / cs) - np.exp(b[idx].sum(axis=1) / cs)
    return (delta, _percentile_interval(boots))


def mcnemar_exact(candidate: Sequence[bool], baseline: Sequence[bool]) -> dict[str, float]:
    """McNemar's exact (binomial) test on paired binary outcomes.

    Returns the discordant counts (``cand_only``: right only for the candidate, ``base_only``:
    right only for the baseline) and the two-sided p-value.
    """
    if len(candidate) != len(baseline):
        raise ValueError("McNemar needs the same items in both runs")
    c_only = sum(1 for a, b in zip(candidate, baseline) if a and not b)
    b_only = sum(1 for a, b in zip(candidate, baseline) if b and not a)
    m = c_only + b_only
    if m == 0:
        p = 1.0
    else:
        k = min(c_only, b_only)
        tail = sum(math.comb(m, i) for i in range(k + 1)) / 2.0**m
        p = min(1.0, 2.0 * tail)
    return {"cand_only": c_only, "base_only": b_only, "p_value": p}


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k estimate for one problem (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 < k <= num_samples:
        raise ValueError(f"pass@{k} needs 1 <= k <= samples ({num_samples})")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(num_samples - num_correct + 1, num_samples + 1)))
