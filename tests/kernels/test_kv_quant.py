"""The int8 KV cache: quantization error bound, and the native paged decode attention over it equal
to its torch reference (which dequantizes), on random caches, GQA groups, windows and lengths."""

import pytest
import torch

from llmopt.kernels import kv_quant
from llmopt.kernels.kv_quant import (
    dequantize_kv,
    paged_decode_attention_int8,
    paged_decode_attention_int8_ref,
    quantize_kv,
    write_kv_int8,
)


def test_quantization_error_is_at_most_half_a_step():
    x = torch.randn(50, 3, 64) * torch.rand(50, 3, 1) * 10
    x[0, 0] = 0.0
    q, s = quantize_kv(x)
    assert q.dtype == torch.int8 and s.shape == (50, 3)
    err = (dequantize_kv(q, s) - x).abs()
    assert bool((err <= s[..., None] / 2 + 1e-6).all())
    assert float(s[0, 0]) == 0.0 and bool((q[0, 0] == 0).all())


def _random_cache(NB, BS, Hk, D, g):
    k, v = torch.randn(NB, BS, Hk, D, generator=g), torch.randn(NB, BS, Hk, D, generator=g)
    kc, vc = torch.zeros(NB, BS, Hk, D, dtype=torch.int8), torch.zeros(NB, BS, Hk, D, dtype=torch.int8)
    ks, vs = torch.zeros(NB, BS, Hk), torch.zeros(NB, BS, Hk)
    slots = torch.arange(NB * BS)
    write_kv_int8(kc, ks, slots, k.reshape(-1, Hk, D))
    write_kv_int8(vc, vs, slots, v.reshape(-1, Hk, D))
    return kc, vc, ks, vs


@pytest.mark.skipif(not kv_quant.native_available(), reason="native kernels not built (no AVX2 or LLMOPT_NATIVE=0)")
@pytest.mark.parametrize("Hq,Hk,D,window", [(4, 2, 64, None), (9, 3, 64, None), (8, 8, 32, 7), (6, 2, 20, None)])
def test_native_int8_decode_attention_matches_the_reference(Hq, Hk, D, window):
    g = torch.Generator().manual_seed(Hq * 100 + D)
    NB, BS, B = 40, 8, 5
    kc, vc, ks, vs = _random_cache(NB, BS, Hk, D, g)
    q = torch.randn(B, Hq, D, generator=g)
    lens = torch.tensor([1, 17, 0, 64, 100], dtype=torch.int32)
    tables = torch.stack([torch.randperm(NB, generator=g)[:13] for _ in range(B)]).to(torch.int32)
    got = paged_decode_attention_int8(q, kc, vc, ks, vs, tables, lens, 0.125, window)
    ref = paged_decode_attention_int8_ref(q, kc, vc, ks, vs, tables, lens, 0.125, window)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert bool((got[2] == 0).all())  # an empty context gives zeros


def test_bad_window_is_refused():
    z8 = torch.zeros(1, 1, 1, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_decode_attention_int8(torch.zeros(1, 1, 8), z8, z8, torch.zeros(1, 1, 1), torch.zeros(1, 1, 1),
                                    torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0, 0)
