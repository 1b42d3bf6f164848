"""Native quantized GEMV/GEMM (llmopt_qgemm) vs the plain-torch references."""

from __future__ import annotations

import os

import pytest
import torch

from llmopt.kernels import build
from llmopt.kernels import qlinear as Q
from llmopt.quant import formats as F

# (fmt, group_size, K): K is a multiple of the group size; several K are deliberately not a
# multiple of the kernel block (int4/fp4: 64, int3/int2: 128, int8/fp8/w8a8: 32) to hit padding.
CASES = [
    ("int4", 32, 96), ("int4", 64, 192), ("int4", 128, 256), ("int4", 256, 512),
    ("int3", 32, 96), ("int3", 64, 192), ("int3", 128, 384), ("int3", 256, 512),
    ("int2", 32, 160), ("int2", 64, 192), ("int2", 128, 256), ("int2", 256, 256),
    ("int8", 32, 96), ("int8", 64, 192), ("int8", 128, 256), ("int8", None, 100),
    ("fp8", None, 100), ("fp8", None, 256),
    ("fp4", None, 96), ("fp4", None, 320),
    ("w8a8", None, 100), ("w8a8", None, 256),
    ("w4a8", 32, 96), ("w4a8", 64, 192), ("w4a8", 128, 256), ("w4a8", 256, 512),
]
MS = [1, 3, 17, 64, 100]  # 100 > LARGE_M takes the decode-chunk + fp32 GEMM path
N = 97


def _has_avx2() -> bool:
    return build.cpu_has_avx2()


@pytest.fixture(scope="module")
def ext():
    if not build.native_enabled():
        pytest.skip("LLMOPT_NATIVE=0")
    mod = Q.native_module()
    if mod is None:
        pytest.skip("llmopt_qgemm did not build (see the llmopt warning in the log)")
    return mod


@pytest.mark.skipif(not _has_avx2(), reason="CPU without AVX2/FMA")
@pytest.mark.skipif(os.environ.get("LLMOPT_NATIVE", "1") in ("0", "false", "no"), reason="LLMOPT_NATIVE=0")
def test_native_extension_builds_on_avx2():
    assert Q.native_module() is not None, "llmopt_qgemm failed to build on an AVX2 machine"
    assert Q.native_available()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("fmt,gs,k", CASES, ids=[f"{f}-g{g}-k{k}" for f, g, k in CASES])
def test_native_matches_reference(ext, fmt, gs, k):
    g = torch.Generator().manual_seed(k + (gs or 0))
    w = torch.randn(N, k, generator=g) * 0.05
    qw = F.quantize(w, fmt, gs)
    assert Q.supports_native(qw)
    bias = torch.randn(N, generator=g)
    for m in MS:
        x = torch.randn(m, k, generator=g)
        for b in (None, bias):
            ref = Q.reference_linear(x, qw, b)
            out = Q.linear(x, qw, b, backend="native")
            assert out.shape == (m, N)
            err = _rel(out, ref)
            assert err < 2e-5, f"{fmt} g{gs} K={k} M={m} bias={b is not None}: rel err {err:.2e}"


@pytest.mark.parametrize("fmt,gs", [("int4", 64), ("int3", 64), ("int8", None), ("fp8", None), ("fp4", None)])
def test_native_dequant_matches_reference(ext, fmt, gs):
    w = torch.randn(N, 192)
    qw = F.quantize(w, fmt, gs)
    assert torch.equal(Q.dequantize_native(qw), F.dequantize(qw))
    assert torch.equal(Q.dequantize_native(qw, 10, 40), F.dequantize(qw)[10:40])


def test_large_m_chunked_path(ext, monkeypatch):
    monkeypatch.setattr(Q, "CHUNK_N", 32)  # N=97 -> 4 chunks incl. a ragged one
    qw = F.quantize(torch.randn(N, 128), "int4", 64)
    x = torch.randn(Q.LARGE_M + 5, 128)
    b = torch.randn(N)
    assert _rel(Q.linear(x, qw, b, backend="native"), Q.reference_linear(x, qw, b)) < 2e-5


def test_fp32_scales_and_3d_bf16_inputs(ext):
    w = torch.randn(N, 128)
    qw = F.quantize(w, "int4", 64, scale_dtype=torch.float32)
    assert qw["scales"].dtype == torch.float32
    x = torch.randn(2, 5, 128)
    assert _rel(Q.linear(x, qw), Q.reference_linear(x, qw)) < 2e-5
    xb = x.to(torch.bfloat16)
    yb = Q.linear(xb, qw)
    assert yb.dtype == torch.bfloat16 and yb.shape == (2, 5, N)
    assert _rel(yb.float(), Q.reference_linear(xb.float(), qw)) < 1e-2


def test_w8a8_activation_quantizer_matches_reference(ext):
    from llmopt.quant.rtn import quantize_activations_int8

    torch.manual_seed(0)
    x = torch.randn(7, 300) * torch.logspace(-3, 2, 7).unsqueeze(1)
    x[3] = 0
    xq, sx = ext.quantize_act_i8(x)
    rq, rs = quantize_activations_int8(x)
    assert torch.equal(xq, rq)
    assert torch.allclose(sx, rs, rtol=3e-7, atol=0)  # torch may divide by a scalar via its reciprocal


@pytest.mark.parametrize("gs", [32, 64, 256])
def test_w4a8_activation_quantizer_matches_reference(ext, gs):
    from llmopt.quant.rtn import quantize_activations_int8_grouped

    torch.manual_seed(gs)
    x = torch.randn(5, 512) * torch.logspace(-3, 2, 5).unsqueeze(1)
    x[2, :gs] = 0
    xq, sx = ext.quantize_act_i8_grouped(x, gs)
    rq, rs = quantize_activations_int8_grouped(x, gs)
    assert torch.equal(xq, rq)
    assert torch.allclose(sx, rs, rtol=3e-7, atol=0)  # torch may divide by a scalar via its reciprocal


def test_w4a8_close_to_int4(ext):
    torch.manual_seed(0)
    w = torch.randn(64, 512) * 0.02
    x = torch.randn(8, 512)
    ref = x @ w.t()
    e4 = (Q.linear(x, F.quantize(w, "int4", 64)) - ref).norm() / ref.norm()
    e48 = (Q.linear(x, F.quantize(w, "w4a8", 64)) - ref).norm() / ref.norm()
    assert e48 < e4 * 1.05  # int8 activations add little on top of the int4 weight error


def test_w8a8_close_to_float_and_fbgemm_like_accuracy(ext):
    torch.manual_seed(0)
    w = torch.randn(64, 512) * 0.02
    x = torch.randn(8, 512)
    qw = F.quantize(w, "w8a8")
    y = Q.linear(x, qw)
    ref = x @ w.t()
    assert ((y - ref).norm() / ref.norm()).item() < 0.02


def test_fallback_when_native_disabled(monkeypatch):
    monkeypatch.setenv("LLMOPT_NATIVE", "0")
    qw = F.quantize(torch.randn(N, 128), "int4", 64)
    x = torch.randn(3, 128)
    assert torch.equal(Q.linear(x, qw), Q.reference_linear(x, qw))
    with pytest.raises(RuntimeError):
        Q.linear(x, qw, backend="native")


def test_unsupported_group_size_falls_back_to_reference():
    qw = F.quantize(torch.randn(N, 96), "int4", 96)  # 96 is neither in-block nor a block multiple
    assert not Q.supports_native(qw)
    x = torch.randn(2, 96)
    assert torch.equal(Q.linear(x, qw), Q.reference_linear(x, qw))


def test_autograd_input_uses_differentiable_path():
    qw = F.quantize(torch.randn(N, 128), "int4", 64)
    x = torch.randn(3, 128, requires_grad=True)
    y = Q.linear(x, qw)
    y.sum().backward()
    assert torch.allclose(x.grad, F.dequantize(qw).sum(0).expand(3, -1), atol=1e-4)
