"""Grouped prefill rows in the native paged attention (fused.cpp: consecutive rows of one sequence with
context lengths L, L+1, .. walk the K/V tiles together) give every row the bits it gets alone: float32,
float16, int8 and fp8 caches."""

from __future__ import annotations

import math

import pytest
import torch

from llmopt.kernels import kv_quant, ops
from tests.conftest import native_or_skip

paged_decode_attention_ref = ops.paged_decode_attention_ref
paged_decode_attention_int8_ref = kv_quant.paged_decode_attention_int8_ref


@pytest.fixture(scope="module")
def ext():
    return native_or_skip(ops._native(), "llmopt_fused")


@pytest.fixture(scope="module")
def ext8():
    return native_or_skip(kv_quant._native(), "llmopt_kv")


@pytest.fixture(params=["float32", "float16", "int8", "fp8"])
def kernel(request, ext):
    """The cache kind under test: (call(q, bt, cl, scale, sw, num_splits, group_rows), public op, reference),
    built for one case by calling the fixture's value with it (float16: the case's cache rounded to halves)."""
    if request.param in ("float32", "float16"):
        def make(case):
            q, kc, vc, _, _ = case
            if request.param == "float16":
                kc, vc = kc.half(), vc.half()

            def call(q, bt, cl, scale, sw, splits, r):
                return ext.paged_decode_attention(q, kc, vc, bt, cl, scale, sw, splits, r)

            def public(q, bt, cl, scale, window):
                return ops.paged_decode_attention(q, kc, vc, bt, cl, scale, window)

            def ref(q, bt, cl, scale, window):
                return paged_decode_attention_ref(q, kc, vc, bt, cl, scale, window)

            return call, public, ref
        return make
    ext8 = request.getfixturevalue("ext8")

    def make8(case):
        q, kc, vc, _, _ = case
        codes = torch.int8 if request.param == "int8" else kv_quant.FP8
        (kq, ks), (vq, vs) = kv_quant.quantize_kv(kc, codes), kv_quant.quantize_kv(vc, codes)

        def call(q, bt, cl, scale, sw, splits, r):  # no token splits in the int8 kernel
            return ext8.paged_decode_attention_int8(q, kq, vq, ks, vs, bt, cl, scale, sw, r)

        def public(q, bt, cl, scale, window):
            return kv_quant.paged_decode_attention_int8(q, kq, vq, ks, vs, bt, cl, scale, window)

        def ref(q, bt, cl, scale, window):
            return paged_decode_attention_int8_ref(q, kq, vq, ks, vs, bt, cl, scale, window)

        return call, public, ref
    return make8


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


def _one_row_at_a_time(call, q, bt, cl, scale, sw):
    """Every row alone (B = 1, no grouping; token chunks by its own context where the kv heads are fewer
    than the threads): the one-row path's bits."""
    return torch.cat([call(q[i : i + 1], bt[i : i + 1], cl[i : i + 1], scale, sw, 0, 1) for i in range(q.shape[0])])


def _check(kernel, case, window, group_sizes=(2, 4, 8, 16)):
    call, public, ref = kernel(case)
    q, _, _, bt, cl = case
    scale = q.shape[-1] ** -0.5
    sw = -1 if window is None else window
    alone = _one_row_at_a_time(call, q, bt, cl, scale, sw)
    for r in group_sizes:
        got = call(q, bt, cl, scale, sw, 0, r)
        bad = [i for i in range(q.shape[0]) if not torch.equal(got[i], alone[i])]
        assert not bad, f"group_rows={r}: rows {bad[:10]} (context lens {cl[bad[:10]].tolist()}) differ from alone"
    out = public(q, bt, cl, scale, window)  # the default group size
    assert torch.equal(out, alone)
    torch.testing.assert_close(out, ref(q, bt, cl, scale, window), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 45])
@pytest.mark.parametrize("G", [1, 2, 3, 4])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_prompts_alone_and_mixed(kernel, block_size, D, G, window):
    # whole prompts of 1..300 rows, a chunk after a cached prefix, decode rows of other sequences
    # before them (as _paged orders rows: decode rows first, then each prefill chunk)
    seed = block_size * 1000 + D * 10 + G + (0 if window is None else 7)
    spans = [(40, 1), (130, 1), (0, 1), (0, 2), (0, 300), (64, 1), (96, 37), (0, 5), (31, 33), (0, 129)]
    _check(kernel, _batch(seed, spans, block_size, hk=2 if G < 3 else 1, G=G, D=D), window)


@pytest.mark.parametrize("window", [None, 100])
def test_every_prompt_length(kernel, window):
    # prompt lengths 1..70 each as its own call: group boundaries fall at every offset of the tile grid
    for n in range(1, 71):
        _check(kernel, _batch(n, [(0, n)], 16, hk=3, G=3, D=64), window, group_sizes=(4, 16))


@pytest.mark.parametrize("prefix", [0, 1, 31, 32, 33, 250])
def test_chunk_after_cached_prefix(kernel, prefix):
    # a chunk whose rows start anywhere on the tile grid, the prefix read from the cache
    _check(kernel, _batch(prefix, [(prefix, 67)], 16, hk=3, G=3, D=64), None)


def test_rows_with_other_blocks_do_not_group(kernel):
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
    _check(kernel, (q, kc, vc, bt.contiguous(), cl), None)
    # and the same lengths with the same blocks do group and still equal their rows alone
    bt2 = bt.clone()
    for i in range(39):
        bt2[i, : math.ceil(int(cl[i]) / 16)] = extra[: math.ceil(int(cl[i]) / 16)]
    _check(kernel, (q, kc, vc, bt2.contiguous(), cl), None)


def test_empty_and_degenerate(kernel):
    case = _batch(9, [(0, 12)], 16, hk=1, G=2, D=64)
    q, kc, vc, bt, cl = case
    cl = cl - 1  # contexts 0..11: the first row attends to nothing (zeros)
    _check(kernel, (q, kc, vc, bt, cl), None)
    call, _, _ = kernel(case)
    assert torch.equal(call(q, bt, cl, 0.125, -1, 0, 16)[0], torch.zeros_like(q[0]))
    with pytest.raises(RuntimeError, match="group_rows"):
        call(q, bt, cl, 0.125, -1, 0, 0)


def test_thread_counts_agree(kernel):
    case = _batch(5, [(10, 1), (0, 200), (17, 60)], 16, hk=3, G=3, D=64)
    call, _, _ = kernel(case)
    q, _, _, bt, cl = case
    old = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(call(q, bt, cl, 0.125, -1, 0, 16))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert torch.equal(outs[0], _one_row_at_a_time(call, q, bt, cl, 0.125, -1))
