"""Attention's AVX-512 steps (fused_kernels.h: tile_scores_avx512, exp_tile_avx512, accumulate_pv2_avx512)
give the AVX2 steps' bits in every module that walks a paged cache: the float and 8-bit kernels, Quest and
the one-call decode step. So the path a CPU picks changes no result and no batch-invariance rule."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmopt.kernels import build, kv_quant, ops, quest
from tests.conftest import native_or_skip
from tests.kernels.test_prefill_attention import _batch
from tests.kernels.test_quest import _cache

ROOT = Path(__file__).resolve().parents[2]
AVX512 = {"avx512f", "avx512dq"} <= build.cpu_flags()


def _modules():
    mods = {"llmopt_fused": ops._native(), "llmopt_kv": kv_quant._native(), "llmopt_quest": quest._ext()}
    return {k: native_or_skip(m, k) for k, m in mods.items()}


@pytest.fixture
def both(request):
    """Runs fn(*args) with the AVX2 steps and with the AVX-512 steps (every module switched together) and
    returns the two results; the setting in force before is restored."""
    mods = _modules()
    before = {k: m.attn_avx512(-1) for k, m in mods.items()}

    def run(fn, *args):
        out = []
        for on in (0, 1):
            for m in mods.values():
                m.attn_avx512(on)
            out.append(fn(*args))
        return out

    yield run
    for k, m in mods.items():
        m.attn_avx512(int(before[k]))


def test_the_switch_follows_the_cpu():
    for name, m in _modules().items():
        assert m.attn_avx512(1) is AVX512, name  # on where the CPU has AVX-512 F/DQ, never above it
        assert m.attn_avx512(0) is False
        m.attn_avx512(1)
    if not AVX512:
        pytest.skip("this CPU has no AVX-512 F/DQ: only the AVX2 steps run here")


SPANS = [(40, 1), (130, 1), (0, 1), (0, 2), (0, 300), (64, 1), (96, 37), (0, 5), (31, 33), (0, 129)]


@pytest.mark.skipif(not AVX512, reason="no AVX-512 F/DQ on this CPU")
@pytest.mark.parametrize("window", [None, 45])
@pytest.mark.parametrize("G,D", [(1, 64), (2, 64), (3, 64), (5, 64), (4, 128), (3, 80), (2, 40), (7, 96)])
def test_float_and_8bit_kernels_bit_for_bit(both, G, D, window):
    q, kc, vc, bt, cl = _batch(G * 100 + D, SPANS, 16, hk=2, G=G, D=D)
    sw = -1 if window is None else window
    ext = ops._native()
    for group in (1, 16):  # rows alone and grouped (prefill)
        a, b = both(ext.paged_decode_attention, q, kc, vc, bt, cl, D ** -0.5, sw, 0, group)
        assert torch.equal(a, b), (G, D, group)
    a, b = both(ext.paged_decode_attention, q[:4], kc, vc, bt[:4], cl[:4], D ** -0.5, sw, 3, 1)  # token splits
    assert torch.equal(a, b)
    ext8 = kv_quant._native()
    for codes in (torch.int8, kv_quant.FP8):
        (kq, ks), (vq, vs) = kv_quant.quantize_kv(kc, codes), kv_quant.quantize_kv(vc, codes)
        a, b = both(ext8.paged_decode_attention_int8, q, kq, vq, ks, vs, bt, cl, D ** -0.5, sw, 16)
        assert torch.equal(a, b), (G, D, codes)
    # and the AVX-512 result is the attention (not merely equal to a wrong AVX2 one)
    torch.testing.assert_close(b, kv_quant.paged_decode_attention_int8_ref(q, kq, vq, ks, vs, bt, cl, D ** -0.5, window),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not AVX512, reason="no AVX-512 F/DQ on this CPU")
def test_extreme_scores_bit_for_bit(both):
    # scores far apart (exp underflows to 0 in a tile), huge and tiny values, a long context
    q, kc, vc, bt, cl = _batch(7, [(0, 70), (500, 1)], 16, hk=1, G=3, D=64)
    kc[::3] *= 40.0
    vc[1::5] *= 1e-30
    ext = ops._native()
    a, b = both(ext.paged_decode_attention, q * 3.0, kc, vc, bt, cl, 0.125, -1, 0, 16)
    assert torch.equal(a, b) and torch.isfinite(b).all()


@pytest.mark.skipif(not AVX512, reason="no AVX-512 F/DQ on this CPU")
@pytest.mark.parametrize("int8", [False, True])
def test_quest_bit_for_bit(both, int8):
    lens = [200, 129, 33, 17]
    kc, vc, ks, vs, kmin, kmax, tables = _cache(lens, int8, seed=3)
    q = torch.randn(len(lens), 6, 64, generator=torch.Generator().manual_seed(4))
    cl = torch.tensor(lens, dtype=torch.int32)
    for topk in (torch.tensor([4, 3, 1, 2], dtype=torch.int32), torch.zeros(4, dtype=torch.int32)):
        a, b = both(quest.quest_decode_attention, q, kc, vc, ks, vs, kmin, kmax, tables, cl, topk, 0.125)
        assert torch.equal(a, b)


def test_env_forces_the_avx2_steps():
    """LLMOPT_CPU_PATH=avx2 (the floor every machine tests) turns the AVX-512 steps off at load, in every
    module, the one-call decode step's included."""
    code = ("from llmopt.kernels import ops, kv_quant, quest, decode_step\n"
            "mods = [ops._native(), kv_quant._native(), quest._ext(), decode_step._native()]\n"
            "print(sorted({m.attn_avx512(-1) for m in mods if m is not None}), sum(m is None for m in mods))\n")
    for value, want in (("avx2", "[False] 0"), ("", f"[{AVX512}] 0")):
        env = dict(os.environ, LLMOPT_CPU_PATH=value, PYTHONPATH=str(ROOT))
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split("\n")[-2] == want, (value, r.stdout, r.stderr[-500:])


@pytest.mark.parametrize("window", [None, 45])
@pytest.mark.parametrize("G,D,hk", [(3, 64, 3), (2, 128, 2), (4, 64, 1), (1, 80, 5)])
def test_decode_rows_walked_whole_equal_each_row_alone(G, D, hk, window):
    """Decode-only calls with rows enough for the threads walk one item per row over all its kv heads
    (fused_kernels.h attend_range_heads); every head's bits are those of the row alone (one item per kv
    head), at any thread count, and the result is the attention."""
    ext = native_or_skip(ops._native(), "llmopt_fused")
    spans = [(n, 1) for n in (300, 1, 31, 32, 33, 129, 70, 5)]  # 8 decode rows, contexts 301, 2, 32, ...
    q, kc, vc, bt, cl = _batch(G * 10 + D + hk, spans, 16, hk=hk, G=G, D=D)
    sw = -1 if window is None else window
    old = torch.get_num_threads()
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)  # (the long row splits into token chunks where hk < nt: alone too)
            alone = torch.cat([ext.paged_decode_attention(q[i:i + 1], kc, vc, bt[i:i + 1], cl[i:i + 1], 0.125, sw,
                                                          0, 1) for i in range(q.shape[0])])
            for b in (2, 4, 6, 8):
                for whole in (1, 0):  # the switch (benchmarks/attention_paths.py) changes no bit either
                    ext.attn_walk_rows(whole)
                    got = ext.paged_decode_attention(q[:b], kc, vc, bt[:b], cl[:b], 0.125, sw, 0, 16)
                    assert torch.equal(got, alone[:b]), (nt, b, whole)
    finally:
        torch.set_num_threads(old)
        ext.attn_walk_rows(1)
    torch.testing.assert_close(alone, ops.paged_decode_attention_ref(q, kc, vc, bt, cl, 0.125, window),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 600])
@pytest.mark.parametrize("G,D,hk", [(4, 64, 1), (3, 64, 2)])
def test_token_chunks_follow_the_context_not_the_batch(G, D, hk, window):
    """With fewer kv heads than threads a long row's tokens are cut into chunks by its own context
    (fused_kernels.h token_chunks), never by the batch: each row's output alone equals its output in every
    batch at the same thread count (prefill runs that cross chunk boundaries, walked as groups, included),
    split rows exist, and the result is the attention."""
    ext = native_or_skip(ops._native(), "llmopt_fused")
    # decode rows of 1,000 / 257 / 40 / 700 tokens and prompt runs ending past 256 / 512 tokens
    spans = [(999, 1), (250, 20), (256, 1), (39, 1), (500, 30), (699, 1)]
    q, kc, vc, bt, cl = _batch(G * 7 + D + hk, spans, 16, hk=hk, G=G, D=D)
    sw = -1 if window is None else window
    ref = ops.paged_decode_attention_ref(q, kc, vc, bt, cl, 0.125, window)
    old = torch.get_num_threads()
    try:
        for nt in (1, 2, 4):
            torch.set_num_threads(nt)
            alone = torch.cat([ext.paged_decode_attention(q[i:i + 1], kc, vc, bt[i:i + 1], cl[i:i + 1], 0.125, sw)
                               for i in range(q.shape[0])])
            split = alone != torch.cat([ext.paged_decode_attention(q[i:i + 1], kc, vc, bt[i:i + 1], cl[i:i + 1],
                                                                   0.125, sw, 1, 1) for i in range(q.shape[0])])
            assert split.any() == (hk < nt), nt  # chunked rows change bits (and only where hk < threads)
            torch.testing.assert_close(alone, ref, rtol=1e-5, atol=1e-5)
            n = q.shape[0]
            for lo, hi in ((0, n), (1, n), (0, 21), (21, n), (n - 31, n - 1), (n - 2, n)):
                got = ext.paged_decode_attention(q[lo:hi], kc, vc, bt[lo:hi], cl[lo:hi], 0.125, sw)
                assert torch.equal(got, alone[lo:hi]), (nt, lo, hi)
    finally:
        torch.set_num_threads(old)
