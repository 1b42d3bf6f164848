"""The 8-bit KV caches (int8 and fp8 e4m3): quantization error bounds, and the native paged decode
attention over them equal to its torch reference (which dequantizes), on random caches, GQA groups,
windows and lengths; every e4m3 code read back exactly."""

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


def test_fp8_quantization_error_is_at_most_half_a_step():
    # e4m3: 3 mantissa bits, so half a step is 2^-4 of the value; below 2^-6 * scale the codes are
    # subnormal, spaced 2^-9 * scale apart
    x = torch.randn(50, 3, 64) * torch.rand(50, 3, 1) * 10
    x[1, 1, :8] = torch.tensor([1e-4, -3e-3, 5e-3, 0.0, 2e-2, -1e-5, 4e-3, 7e-3]) * x[1, 1].abs().max()
    x[0, 0] = 0.0
    q, s = quantize_kv(x, kv_quant.FP8)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (50, 3)
    err = (dequantize_kv(q, s) - x).abs()
    bound = torch.maximum(x.abs() * 2.0**-4, s[..., None] * 2.0**-10) * (1 + 1e-6)
    assert bool((err <= bound).all())
    assert float(s[0, 0]) == 0.0 and bool((q[0, 0].float() == 0).all())
    with pytest.raises(ValueError, match="int8 or float8_e4m3fn"):
        quantize_kv(x, torch.float16)


def _random_cache(NB, BS, Hk, D, g, dtype=torch.int8):
    k, v = torch.randn(NB, BS, Hk, D, generator=g), torch.randn(NB, BS, Hk, D, generator=g)
    kc, vc = torch.zeros(NB, BS, Hk, D, dtype=dtype), torch.zeros(NB, BS, Hk, D, dtype=dtype)
    ks, vs = torch.zeros(NB, BS, Hk), torch.zeros(NB, BS, Hk)
    slots = torch.arange(NB * BS)
    write_kv_int8(kc, ks, slots, k.reshape(-1, Hk, D))
    write_kv_int8(vc, vs, slots, v.reshape(-1, Hk, D))
    return kc, vc, ks, vs


@pytest.mark.skipif(not kv_quant.native_available(), reason="native kernels not built (no AVX2 or LLMOPT_NATIVE=0)")
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("Hq,Hk,D,window", [(4, 2, 64, None), (9, 3, 64, None), (8, 8, 32, 7), (6, 2, 20, None)])
def test_native_int8_decode_attention_matches_the_reference(Hq, Hk, D, window, dtype):
    g = torch.Generator().manual_seed(Hq * 100 + D)
    NB, BS, B = 40, 8, 5
    kc, vc, ks, vs = _random_cache(NB, BS, Hk, D, g, dtype)
    q = torch.randn(B, Hq, D, generator=g)
    lens = torch.tensor([1, 17, 0, 64, 100], dtype=torch.int32)
    tables = torch.stack([torch.randperm(NB, generator=g)[:13] for _ in range(B)]).to(torch.int32)
    got = paged_decode_attention_int8(q, kc, vc, ks, vs, tables, lens, 0.125, window)
    ref = paged_decode_attention_int8_ref(q, kc, vc, ks, vs, tables, lens, 0.125, window)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert bool((got[2] == 0).all())  # an empty context gives zeros


@pytest.mark.skipif(not kv_quant.native_available(), reason="native kernels not built (no AVX2 or LLMOPT_NATIVE=0)")
@pytest.mark.parametrize("D", [64, 20])
def test_native_fp8_reads_every_code_back_exactly(D):
    # a context of one token: attention returns that token's V row, so the kernel's dequantized codes
    # (F16C widening of the code's bits, subnormal codes included) are compared with torch's, exactly
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    rows = -(-len(codes) // D)
    v = torch.zeros(rows * D, dtype=torch.uint8)
    v[: len(codes)] = codes
    vc = v.view(rows, 1, 1, D).view(torch.float8_e4m3fn)
    kc = torch.zeros_like(vc)
    for scale in (1.0, 0.37, 3e-3):
        vs = torch.full((rows, 1, 1), scale)
        got = paged_decode_attention_int8(torch.randn(rows, 1, D), kc, vc, torch.ones(rows, 1, 1), vs,
                                          torch.arange(rows, dtype=torch.int32)[:, None],
                                          torch.ones(rows, dtype=torch.int32), 0.125)
        assert torch.equal(got.reshape(rows, D), dequantize_kv(vc, vs).reshape(rows, D)), scale


@pytest.mark.skipif(not kv_quant.native_available(), reason="native kernels not built (no AVX2 or LLMOPT_NATIVE=0)")
def test_native_rejects_mixed_code_types():
    z8, f8 = torch.zeros(1, 1, 1, 8, dtype=torch.int8), torch.zeros(1, 1, 1, 8, dtype=torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match="of one dtype"):
        kv_quant._native().paged_decode_attention_int8(
            torch.zeros(1, 1, 8), f8, z8, torch.zeros(1, 1, 1), torch.zeros(1, 1, 1),
            torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0)


def test_bad_window_is_refused():
    z8 = torch.zeros(1, 1, 1, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="sliding_window"):
        paged_decode_attention_int8(torch.zeros(1, 1, 8), z8, z8, torch.zeros(1, 1, 1), torch.zeros(1, 1, 1),
                                    torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0, 0)
