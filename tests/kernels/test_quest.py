"""Quest sparse decode attention: the native summaries, selection and attention equal their torch
references; reading every block is the dense kernels' result bit for bit; a row's result does not
depend on the batch."""

from __future__ import annotations

import pytest
import torch

from llmopt.kernels import kv_quant, ops, quest

pytestmark = pytest.mark.skipif(not quest.native_available(), reason="native quest kernel not built")

BS, HK, G, D = 16, 2, 3, 64
SCALE = D ** -0.5


def _cache(lens: list[int], int8: bool | torch.dtype, seed: int = 0):
    """A paged cache holding len(lens) sequences in shuffled blocks, written through the summaries'
    update the way the model does it (prefill chunks, then one token at a time)."""
    g = torch.Generator().manual_seed(seed)
    nbs = [(n + BS - 1) // BS for n in lens]
    NB = sum(nbs) + 3
    perm = torch.randperm(NB, generator=g).tolist()
    tables = torch.zeros(len(lens), max(nbs), dtype=torch.int32)
    i = 0
    for b, nb in enumerate(nbs):
        tables[b, :nb] = torch.tensor(perm[i:i + nb], dtype=torch.int32)
        i += nb
    kc = torch.zeros(NB, BS, HK, D)
    vc = torch.zeros(NB, BS, HK, D)
    kmin = torch.full((NB, HK, D), 7.0)  # stale garbage: offset 0 must reset it
    kmax = torch.full((NB, HK, D), -7.0)
    ks = vs = None
    if int8:  # True: int8 codes; or the code dtype (int8, float8_e4m3fn)
        codes = torch.int8 if int8 is True else int8
        kc, vc = kc.to(codes), vc.to(codes)
        ks, vs = torch.zeros(NB, BS, HK), torch.zeros(NB, BS, HK)
    for b, n in enumerate(lens):
        # keys with a few "hot" blocks so that selection has something to find
        k = torch.randn(n, HK, D, generator=g) + 3.0 * torch.randn(n // BS + 1, 1, D, generator=g).repeat_interleave(
            BS, 0)[:n]
        v = torch.randn(n, HK, D, generator=g)
        t = torch.arange(n)
        slots = tables[b].long()[t // BS] * BS + t % BS
        for lo, hi in ((0, n * 2 // 3), (n * 2 // 3, n)):  # a chunk, then the rest
            sl = slots[lo:hi]
            if int8:
                kv_quant.write_kv_int8(kc, ks, sl, k[lo:hi])
                kv_quant.write_kv_int8(vc, vs, sl, v[lo:hi])
                rows = kv_quant.dequantize_kv(kc.view(-1, HK, D)[sl], ks.view(-1, HK)[sl])
            else:
                kc.view(-1, HK, D)[sl] = k[lo:hi]
                vc.view(-1, HK, D)[sl] = v[lo:hi]
                rows = k[lo:hi]
            quest.update_summaries(kmin, kmax, rows, sl, BS)
    return kc, vc, ks, vs, kmin, kmax, tables


def test_native_summaries_equal_the_reference_and_the_true_block_min_max():
    lens = [100, 37, 64]
    kc, _, _, _, kmin, kmax, tables = _cache(lens, False)
    ref_min, ref_max = torch.full_like(kmin, 7.0), torch.full_like(kmax, -7.0)
    for b, n in enumerate(lens):
        t = torch.arange(n)
        slots = tables[b].long()[t // BS] * BS + t % BS
        quest.update_summaries_ref(ref_min, ref_max, kc.view(-1, HK, D)[slots], slots, BS)
        for j in range((n + BS - 1) // BS):
            blk = int(tables[b, j])
            rows = kc[blk, : min(BS, n - j * BS)]
            assert torch.equal(kmin[blk], rows.amin(0)) and torch.equal(kmax[blk], rows.amax(0))
    assert torch.equal(kmin, ref_min) and torch.equal(kmax, ref_max)


@pytest.mark.parametrize("int8", [False, True, torch.float8_e4m3fn])
def test_kernel_equals_torch_reference(int8):
    lens = [200, 129, 33, 17]
    kc, vc, ks, vs, kmin, kmax, tables = _cache(lens, int8, seed=1)
    q = torch.randn(len(lens), HK * G, D, generator=torch.Generator().manual_seed(2))
    topk = torch.tensor([4, 3, 1, 2], dtype=torch.int32)
    cl = torch.tensor(lens, dtype=torch.int32)
    sel = quest.quest_select(q, kmin, kmax, tables, cl, topk, BS, SCALE)
    assert torch.equal(sel, quest.quest_select_ref(q, kmin, kmax, tables, cl, topk, BS, SCALE))
    assert sel[0].sum(-1).tolist() == [4, 4] and sel[1].sum(-1).tolist() == [3, 3]
    assert sel[2].sum(-1).tolist() == [2, 2]  # 3 blocks, k=1: the sink and the current block
    assert sel[3].sum(-1).tolist() == [2, 2]  # k >= its 2 blocks: all
    assert bool(sel[:, :, 0].all())
    got = quest.quest_decode_attention(q, kc, vc, ks, vs, kmin, kmax, tables, cl, topk, SCALE)
    want = quest.quest_decode_attention_ref(q, kc, vc, ks, vs, kmin, kmax, tables, cl, topk, SCALE)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dense = quest.quest_decode_attention_ref(q, kc, vc, ks, vs, kmin, kmax, tables, cl, torch.zeros_like(topk), SCALE)
    assert not torch.allclose(got[:2], dense[:2], atol=1e-3)  # it really skipped blocks


@pytest.mark.parametrize("int8", [False, True, torch.float8_e4m3fn])
def test_budget_covering_the_context_is_the_dense_kernel_bit_for_bit(int8):
    lens = [200, 129, 33]
    kc, vc, ks, vs, kmin, kmax, tables = _cache(lens, int8, seed=3)
    q = torch.randn(len(lens), HK * G, D, generator=torch.Generator().manual_seed(4))
    cl = torch.tensor(lens, dtype=torch.int32)
    if int8:
        dense = kv_quant.paged_decode_attention_int8(q, kc, vc, ks, vs, tables, cl, SCALE)
    else:
        dense = ops.paged_decode_attention(q, kc, vc, tables, cl, SCALE)
    for topk in ([0, 0, 0], [13, 9, 3], [100, 100, 100]):
        got = quest.quest_decode_attention(q, kc, vc, ks, vs, kmin, kmax, tables, cl,
                                           torch.tensor(topk, dtype=torch.int32), SCALE)
        assert torch.equal(got, dense), topk


@pytest.mark.parametrize("pinned", [False, True])
@pytest.mark.parametrize("int8", [False, True, torch.float8_e4m3fn])
def test_a_row_alone_equals_the_row_in_a_batch(int8, pinned):
    lens = [300, 150, 77, 260]
    kc, vc, ks, vs, kmin, kmax, tables = _cache(lens, int8, seed=5)
    q = torch.randn(len(lens), HK * G, D, generator=torch.Generator().manual_seed(6))
    cl = torch.tensor(lens, dtype=torch.int32)
    topk = torch.tensor([5, 0, 3, 4], dtype=torch.int32)
    pins = _random_pins(len(lens), tables.shape[1], 2, seed=13) if pinned else None
    batched = quest.quest_decode_attention(q, kc, vc, ks, vs, kmin, kmax, tables, cl, topk, SCALE, pins)
    for b in range(len(lens)):
        alone = quest.quest_decode_attention(q[b:b + 1], kc, vc, ks, vs, kmin, kmax, tables[b:b + 1], cl[b:b + 1],
                                             topk[b:b + 1], SCALE, None if pins is None else pins[b:b + 1])
        assert torch.equal(alone[0], batched[b])


def test_bad_inputs_are_refused_with_a_reason():
    kc, vc, ks, vs, kmin, kmax, tables = _cache([40], False)
    q = torch.randn(1, HK * G, D)
    cl = torch.tensor([40], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="topk"):
        quest.quest_decode_attention(q, kc, vc, None, None, kmin, kmax, tables, cl, torch.tensor([1, 2]), SCALE)
    with pytest.raises(RuntimeError, match="kmin / kmax"):
        quest.quest_decode_attention(q, kc, vc, None, None, kmin[:, :1], kmax, tables, cl,
                                     torch.tensor([1], dtype=torch.int32), SCALE)
    with pytest.raises(RuntimeError, match="8-bit cache needs"):
        quest.quest_decode_attention(q, kc.to(torch.int8), vc.to(torch.int8), None, None, kmin, kmax, tables, cl,
                                     torch.tensor([1], dtype=torch.int32), SCALE)


def test_a_narrow_block_holding_the_matching_key_outranks_a_wide_block_of_unrelated_keys():
    # q . k is 9.6 for every key of block 2 (narrow: all rows equal) and 0 for every key of block 1,
    # whose rows +-0.25 * s (balanced signs) span [-0.25, 0.25] in every dimension: Quest's upper
    # bound of block 1 is 64 * 0.25 = 16 > 9.6 and would read it instead; the centre + half-radius
    # score (0 + 0.5 * 16 = 8) reads block 2, where the attention mass is.
    d, bs = 64, 16
    g = torch.Generator().manual_seed(7)
    q = torch.ones(1, 1, d)
    signs = torch.ones(bs // 2, d)
    for i in range(bs // 2):
        signs[i, torch.randperm(d, generator=g)[: d // 2]] = -1.0
    wide = 0.25 * torch.cat([signs, -signs])  # [bs, d]: every row scores 0, every dimension spans +-0.25
    kc = torch.randn(4, bs, 1, d, generator=g) * 0.01
    kc[1, :, 0] = wide
    kc[2, :, 0] = 0.15
    vc = torch.randn(4, bs, 1, d, generator=g)
    kmin, kmax = torch.zeros(4, 1, d), torch.zeros(4, 1, d)
    for blk in range(4):
        quest.update_summaries(kmin, kmax, kc[blk], blk * bs + torch.arange(bs), bs)
    tables = torch.arange(4, dtype=torch.int32)[None]
    cl = torch.tensor([4 * bs - 5], dtype=torch.int32)
    topk = torch.tensor([3], dtype=torch.int32)  # the sink, the current block and one more
    assert float(torch.maximum(q[0] * kmin[1], q[0] * kmax[1]).sum()) == pytest.approx(16.0)  # Quest's bound
    for select in (quest.quest_select, quest.quest_select_ref):
        chosen = select(q, kmin, kmax, tables, cl, topk, bs, 1.0)
        assert chosen[0, 0].nonzero().flatten().tolist() == [0, 2, 3], select.__name__
    # radius weight 1 is Quest's upper bound, which reads the wide block 1 instead
    bound = quest.quest_select_ref(q, kmin, kmax, tables, cl, topk, bs, 1.0, radius=1.0)
    assert bound[0, 0].nonzero().flatten().tolist() == [0, 1, 3]
    got = quest.quest_decode_attention(q, kc, vc, None, None, kmin, kmax, tables, cl, topk, 1.0)
    dense = ops.paged_decode_attention(q, kc, vc, tables, cl, 1.0)
    torch.testing.assert_close(got, dense, rtol=0, atol=2e-3)


def _random_pins(B: int, MB: int, per_head: int, seed: int) -> torch.Tensor:
    """uint8 [B, HK, MB]: ``per_head`` random pinned block indices per (row, kv head)."""
    g = torch.Generator().manual_seed(seed)
    pins = torch.zeros(B, HK, MB, dtype=torch.uint8)
    for b in range(B):
        for h in range(HK):
            pins[b, h, torch.randperm(MB, generator=g)[:per_head]] = 1
    return pins


@pytest.mark.parametrize("int8", [False, True, torch.float8_e4m3fn])
def test_pinned_blocks_are_read_within_the_budget_native_equals_reference(int8):
    """Pins (kv_quest_pin): the native selection and attention equal the torch reference; every
    pinned block between the first and the current one is read while k - 2 places can hold them, and
    the budget does not grow; the rest of the places go to the best-scoring unpinned blocks."""
    lens = [300, 260, 150, 77]
    kc, vc, ks, vs, kmin, kmax, tables = _cache(lens, int8, seed=7)
    q = torch.randn(len(lens), HK * G, D, generator=torch.Generator().manual_seed(8))
    cl = torch.tensor(lens, dtype=torch.int32)
    topk = torch.tensor([6, 5, 4, 3], dtype=torch.int32)
    MB = tables.shape[1]
    pins = _random_pins(len(lens), MB, 3, seed=9)
    sel = quest.quest_select(q, kmin, kmax, tables, cl, topk, BS, SCALE, pins)
    ref = quest.quest_select_ref(q, kmin, kmax, tables, cl, topk, BS, SCALE, pins=pins)
    assert torch.equal(sel, ref)
    plain = quest.quest_select_ref(q, kmin, kmax, tables, cl, topk, BS, SCALE)
    assert not torch.equal(sel, plain)  # the pins changed the choice
    for b, n in enumerate(lens):
        nb, k = (n + BS - 1) // BS, int(topk[b])
        for h in range(HK):
            chosen = sel[b, h, :nb]
            assert int(chosen.sum()) == k and bool(chosen[0]) and bool(chosen[nb - 1])  # the budget, sinks, current
            mid = [j for j in range(1, nb - 1) if pins[b, h, j]]
            if len(mid) <= k - 2:
                assert all(bool(chosen[j]) for j in mid), (b, h, mid)
                # the unpinned places: the plain rule's order among the unpinned blocks
                free = [j for j in range(1, nb - 1) if chosen[j] and not pins[b, h, j]]
                assert len(free) == k - 2 - len(mid)
            else:  # more pins than places: only pinned blocks, still k of them
                assert all(bool(pins[b, h, j]) for j in range(1, nb - 1) if chosen[j])
    got = quest.quest_decode_attention(q, kc, vc, ks, vs, kmin, kmax, tables, cl, topk, SCALE, pins)
    want = quest.quest_decode_attention_ref(q, kc, vc, ks, vs, kmin, kmax, tables, cl, topk, SCALE, pins)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("int8", [False, True])
def test_no_pins_is_plain_quest_bit_for_bit(int8):  # pinned rows alone == in a batch: the test above
    lens = [300, 150, 77, 260]
    kc, vc, ks, vs, kmin, kmax, tables = _cache(lens, int8, seed=11)
    q = torch.randn(len(lens), HK * G, D, generator=torch.Generator().manual_seed(12))
    cl = torch.tensor(lens, dtype=torch.int32)
    topk = torch.tensor([5, 0, 3, 4], dtype=torch.int32)
    plain = quest.quest_decode_attention(q, kc, vc, ks, vs, kmin, kmax, tables, cl, topk, SCALE)
    zeros = torch.zeros(len(lens), HK, tables.shape[1], dtype=torch.uint8)
    assert torch.equal(quest.quest_decode_attention(q, kc, vc, ks, vs, kmin, kmax, tables, cl, topk, SCALE, zeros),
                       plain)
    pins = _random_pins(len(lens), tables.shape[1], 2, seed=13)
    with pytest.raises(RuntimeError, match="pins"):
        quest.quest_decode_attention(q, kc, vc, ks, vs, kmin, kmax, tables, cl, topk, SCALE,
                                     pins[:, :1].contiguous())


def test_pins_are_each_heads_best_voted_blocks():
    """quest_pins: a block's vote is its best max-pooled row before the window; the first block and
    the window's own rows vote for nothing; ties go to the lower block."""
    C, W, bs = 100, 8, 10  # 10 blocks; rows 92-99 are the window (block 9)
    s = torch.zeros(2, C)
    s[0, 5] = 9.0  # block 0: never pinned
    s[0, 95] = 9.0  # the window: never pinned
    s[0, 43] = 3.0  # block 4 (pooled over 5: rows 41-45)
    s[0, 71] = 2.0  # block 7 (and row 69 in block 6 sees it through the pool)
    s[1, 25] = 1.0  # block 2 (pooled: rows 23-27)
    s[1, 35] = 1.0  # block 3, a tie with block 2
    pins = quest.quest_pins(s, 2, bs, W, 5)
    assert pins.shape == (2, 10) and pins.dtype == torch.uint8
    assert pins[0].nonzero().flatten().tolist() == [4, 6]  # 4, then the tie between 6 and 7: the lower
    assert pins[1].nonzero().flatten().tolist() == [2, 3]
    assert quest.quest_pins(s, 1, bs, W, 1)[0].nonzero().flatten().tolist() == [4]
    assert int(quest.quest_pins(s, 0, bs, W, 5).sum()) == 0
    assert int(quest.quest_pins(torch.zeros(2, 12), 2, bs, W, 1).sum()) == 0  # no row before the window past block 0
