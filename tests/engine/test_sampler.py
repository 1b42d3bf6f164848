"""The sampler's token draw: the tempered, filtered distribution, never a token of probability 0,
and a seeded row independent of the rest of the batch."""

import pytest
import torch

from llmopt.engine.sampler import sample_rows
from llmopt.engine.sampling_params import SamplingParams


def _draw(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    toks = [sample_rows(logits[None].clone(), [params], [g])[0] for _ in range(n)]
    return torch.bincount(torch.tensor(toks), minlength=logits.shape[0]).double() / n


def test_sampled_frequencies_follow_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0])
    n = 20_000
    for temp in (1.0, 0.7, 1.5):
        want = torch.softmax(logits.double() / temp, -1)
        got = _draw(logits, SamplingParams(temperature=temp), n)
        sd = (want * (1 - want) / n).sqrt()
        assert ((got - want).abs() <= 5 * sd + 1e-9).all(), (temp, got, want)


def test_tokens_outside_top_k_and_top_p_are_never_sampled():
    logits = torch.tensor([3.0, 2.9, 2.8, 0.0, -1.0, 1.0])
    got = _draw(logits, SamplingParams(temperature=1.0, top_k=2), 4000)
    assert got[0] > 0.4 and got[1] > 0.4 and got[2:].sum() == 0
    # top_p 0.5: the smallest prefix reaching half the mass is tokens 0 and 1
    got = _draw(logits, SamplingParams(temperature=1.0, top_p=0.5), 4000)
    assert got[0] > 0.4 and got[1] > 0.4 and got[2:].sum() == 0
    masked = logits.clone()
    masked[0] = float("-inf")  # a grammar mask: probability exactly 0
    got = _draw(masked, SamplingParams(temperature=2.0), 4000)
    assert got[0] == 0 and (got[1:] > 0).all()


def test_a_seeded_row_samples_the_same_tokens_whatever_else_is_in_the_batch():
    torch.manual_seed(0)
    vocab = 49_152
    row = torch.randn(vocab) * 3
    sp = SamplingParams(temperature=0.9, top_k=50, seed=7)
    alone_g = torch.Generator().manual_seed(7)
    alone = [sample_rows(row[None].clone(), [sp], [alone_g])[0] for _ in range(20)]
    batch_g = torch.Generator().manual_seed(7)
    others = [torch.Generator().manual_seed(i) for i in range(5)]
    in_batch = []
    for _ in range(20):
        logits = torch.cat([torch.randn(2, vocab), row[None], torch.randn(3, vocab)])
        params = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.3, top_p=0.9), sp,
                  SamplingParams(temperature=0.5), SamplingParams(temperature=1.0, top_k=3),
                  SamplingParams(temperature=2.0)]
        gens = others[:2] + [batch_g] + others[2:]
        in_batch.append(sample_rows(logits, params, gens)[2])
    assert alone == in_batch
    assert len(set(alone)) > 1


def test_sample_rows_needs_one_setting_and_generator_per_row():
    with pytest.raises(ValueError, match="one SamplingParams and one generator per row"):
        sample_rows(torch.zeros(2, 5), [SamplingParams(temperature=1.0)], [None])


def _same_as_max(x: torch.Tensor) -> None:
    from llmopt.engine.sampler import greedy_rows

    want = x.max(-1)
    top, idx = greedy_rows(x)
    assert torch.equal(idx, want.indices), (idx, want.indices)
    assert torch.equal(top, want.values) or (torch.isnan(top) == torch.isnan(want.values)).all()


@pytest.mark.parametrize("vocab", [49152, 151936, 5000, 2049, 512, 7])
def test_greedy_rows_equals_torch_max_first_index(vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(9, vocab, generator=g)
    _same_as_max(x)
    # ties: the maximum twice in one chunk, in two chunks, in the tail chunk and at the very last column
    t = x.clone()
    for r, cols in enumerate([(3, 7), (1, vocab - 1), (vocab // 2, vocab // 2 + 600), (vocab - 2, vocab - 1),
                              (0, vocab - 1), (vocab - 1,)]):
        for c in cols:
            t[r, min(c, vocab - 1)] = 50.0
    _same_as_max(t)
    # masked rows (guided decoding): a few finite entries, or none at all
    m = torch.full((3, vocab), float("-inf"))
    m[0, vocab - 1] = -3.0
    m[1, [vocab // 3, vocab // 5]] = 1.0
    _same_as_max(m)
    # a NaN is torch's maximum
    n = x.clone()
    n[2, vocab // 2] = float("nan")
    _same_as_max(n)
    # selected rows (a copy), one row, other dtypes
    _same_as_max(x[[0, 4, 8]])
    _same_as_max(x[:1])
    _same_as_max(x.to(torch.bfloat16))
