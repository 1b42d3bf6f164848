"""Grouped prefill rows in the native paged attention (fused.cpp: consecutive rows of one sequence with
context lengths L, L+1, .. walk the K/V tiles together) give every row the bits it gets alone."""

from __future__ import annotations

import math

import pytest
import torch

from llmopt.kernels import ops

paged_decode_attention_ref = ops.paged_decode_attention_ref


@pytest.fixture(scope="module")
def ext():
    mod = ops._native()
    if mod is None:
        pytest.skip("native extension llmopt_fused unavailable: build failed (see the llmopt warning) or LLMOPT_NATIVE=0")
    return mod


def _batch(seed, spans, block_size, hk, G, D, pad_junk=True):
    """A random paged cache and one attention call's rows, as transformer._paged lays them out.

    spans: list of (prefix, q_len) per sequence; the sequence's rows have context lengths prefix + 1 ..
    prefix + q_len (q_len 1 with a prefix is a decode row). Each sequence gets its own blocks drawn from
    a permuted pool; a row's table holds the blocks its own context covers and then junk (block ids
    that exist but belong to no one, different per row) when pad_junk, so only the blocks a row reads
    can matter: a group must read the longest row's table.
    """
    g = torch.Generator().manual_seed(seed)
    nblk = [math.ceil((p + n) / block_size) for p, n in spans]
    width = max(nblk) + 2
    num_blocks = sum(nblk) + 5
    perm = torch.randperm(num_blocks, generator=g)
    tables, lens, used = [], [], 0
    for (prefix, q_len), nb in zip(spans, nblk, strict=True):
        seq_table = perm[used : used + nb].int()
        used += nb
        for L in range(prefix + 1, prefix + q_len + 1):
            row = torch.full((width,), -1, dtype=torch.int32)
            if pad_junk:  # spare blocks perm[used:] belong to no sequence
                row[:] = perm[torch.randint(sum(nblk), num_blocks, (width,), generator=g)].int()
            own = math.ceil(L / block_size)
            row[:own] = seq_table[:own]
            tables.append(row)
            lens.append(L)
    kc = torch.randn(num_blocks, block_size, hk, D, generator=g)
    vc = torch.randn(num_blocks, block_size, hk, D, generator=g)
    q = torch.randn(len(lens), hk * G, D, generator=g)
    return q, kc, vc, torch.stack(tables), torch.tensor(lens, dtype=torch.int32)


def _one_row_at_a_time(ext, q, kc, vc, bt, cl, scale, sw):
    """Every row alone (B = 1, no token split): the one-row path's bits."""
    return torch.cat([ext.paged_decode_attention(q[i : i + 1], kc, vc, bt[i : i + 1], cl[i : i + 1], scale, sw, 1, 1)
                      for i in range(q.shape[0])])


def _check(ext, case, window, group_sizes=(2, 4, 8)):
    q, kc, vc, bt, cl = case
    scale = q.shape[-1] ** -0.5
    sw = -1 if window is None else window
    alone = _one_row_at_a_time(ext, *case, scale, sw)
    for r in group_sizes:
        got = ext.paged_decode_attention(q, kc, vc, bt, cl, scale, sw, 0, r)
        bad = [i for i in range(q.shape[0]) if not torch.equal(got[i], alone[i])]
        assert not bad, f"group_rows={r}: rows {bad[:10]} (context lens {cl[bad[:10]].tolist()}) differ from alone"
    public = ops.paged_decode_attention(q, kc, vc, bt, cl, scale, window)  # the default group size
    assert torch.equal(public, alone)
    torch.testing.assert_close(public, paged_decode_attention_ref(q, kc, vc, bt, cl, scale, window),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 45])
@pytest.mark.parametrize("G", [1, 2, 3, 4])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_prompts_alone_and_mixed(ext, block_size, D, G, window):
    # whole prompts of 1..300 rows, a chunk after a cached prefix, decode rows of other sequences
    # before them (as _paged orders rows: decode rows first, then each prefill chunk)
    seed = block_size * 1000 + D * 10 + G + (0 if window is None else 7)
    spans = [(40, 1), (130, 1), (0, 1), (0, 2), (0, 300), (64, 1), (96, 37), (0, 5), (31, 33), (0, 129)]
    _check(ext, _batch(seed, spans, block_size, hk=2 if G < 3 else 1, G=G, D=D), window)


@pytest.mark.parametrize("window", [None, 100])
def test_every_prompt_length(ext, window):
    # prompt lengths 1..70 each as its own call: group boundaries fall at every offset of the tile grid
    for n in range(1, 71):
        _check(ext, _batch(n, [(0, n)], 16, hk=3, G=3, D=64), window, group_sizes=(4, 8))


@pytest.mark.parametrize("prefix", [0, 1, 31, 32, 33, 250])
def test_chunk_after_cached_prefix(ext, prefix):
    # a chunk whose rows start anywhere on the tile grid, the prefix read from the cache
    _check(ext, _batch(prefix, [(prefix, 67)], 16, hk=3, G=3, D=64), None)


def test_rows_with_other_blocks_do_not_group(ext):
    # two sequences whose rows have consecutive context lengths (prompt A: rows 0..38 with contexts
    # 1..39, prompt B: rows 39..79 with contexts 40..80; 39 is no multiple of 2, 4 or 8, so a group
    # would straddle them) but different blocks: grouping them would read B's K/V for A's rows
    q, kc, vc, bt, cl = _batch(3, [(0, 39), (0, 41)], 16, hk=1, G=4, D=64, pad_junk=False)
    cl[39:] += 39
    n_b = math.ceil(80 / 16)
    bt = torch.cat([bt, torch.full((bt.shape[0], n_b), -1, dtype=torch.int32)], dim=1)
    extra = torch.randperm(kc.shape[0], generator=torch.Generator().manual_seed(1))[:n_b].int()
    for i in range(39, 80):
        own = math.ceil(int(cl[i]) / 16)
        bt[i, :own] = extra[:own]
    _check(ext, (q, kc, vc, bt.contiguous(), cl), None)
    # and the same lengths with the same blocks do group and still equal their rows alone
    bt2 = bt.clone()
    for i in range(39):
        bt2[i, : math.ceil(int(cl[i]) / 16)] = extra[: math.ceil(int(cl[i]) / 16)]
    _check(ext, (q, kc, vc, bt2.contiguous(), cl), None)


def test_empty_and_degenerate(ext):
    q, kc, vc, bt, cl = _batch(9, [(0, 12)], 16, hk=1, G=2, D=64)
    cl = cl - 1  # contexts 0..11: the first row attends to nothing (zeros)
    _check(ext, (q, kc, vc, bt, cl), None)
    assert torch.equal(ext.paged_decode_attention(q, kc, vc, bt, cl, 0.125, -1, 0, 4)[0], torch.zeros_like(q[0]))
    with pytest.raises(RuntimeError, match="group_rows"):
        ext.paged_decode_attention(q, kc, vc, bt, cl, 0.125, -1, 0, 0)


def test_thread_counts_agree(ext):
    case = _batch(5, [(10, 1), (0, 200), (17, 60)], 16, hk=3, G=3, D=64)
    q, kc, vc, bt, cl = case
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(ext.paged_decode_attention(q, kc, vc, bt, cl, 0.125, -1, 0, 4))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert torch.equal(outs[0], _one_row_at_a_time(ext, *case, 0.125, -1))
