"""Native quantized GEMV/GEMM (llmopt_qgemm) vs the plain-torch references."""

from __future__ import annotations

import os

import pytest
import torch

from llmopt.formats import layouts as F
from llmopt.kernels import build
from llmopt.kernels import qlinear as Q

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
    from llmopt.formats.rtn import quantize_activations_int8

    torch.manual_seed(0)
    x = torch.randn(7, 300) * torch.logspace(-3, 2, 7).unsqueeze(1)
    x[3] = 0
    xq, sx = ext.quantize_act_i8(x)
    rq, rs = quantize_activations_int8(x)
    assert torch.equal(xq, rq)
    assert torch.allclose(sx, rs, rtol=3e-7, atol=0)  # torch may divide by a scalar via its reciprocal


@pytest.mark.parametrize("gs", [32, 64, 256])
def test_w4a8_activation_quantizer_matches_reference(ext, gs):
    from llmopt.formats.rtn import quantize_activations_int8_grouped

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
    e4 = (Q.linear(x, F.quantize(w, "int4", 64), act="fp32") - ref).norm() / ref.norm()
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


# ---- int4 with int8 activations (w4a8 kernel on the int4 lane layout) ---------------------------
A8_CASES = [(64, 64), (64, 320), (128, 384), (128, 640), (256, 768), (64, 1088)]  # 1088: 17 groups


@pytest.mark.parametrize("gs,k", A8_CASES, ids=[f"g{g}-k{k}" for g, k in A8_CASES])
def test_int4_act_int8_native_matches_reference(ext, gs, k):
    g = torch.Generator().manual_seed(7 * k + gs)
    w = torch.randn(N, k, generator=g) * 0.05
    qw = F.quantize(w, "int4", gs)
    bias = torch.randn(N, generator=g)
    for m in (1, 2, 3, 5, 16, 17, 100):
        x = torch.randn(m, k, generator=g) * torch.logspace(-2, 1, m).unsqueeze(1)
        for b in (None, bias):
            ref = Q.reference_linear(x, qw, b, act="int8")
            out = Q.linear(x, qw, b, backend="native", act="int8")
            err = _rel(out, ref)
            assert err < 2e-5, f"g{gs} K={k} M={m} bias={b is not None}: rel err {err:.2e}"
            exact = Q.linear(x, qw, b, backend="native", act="fp32")
            assert _rel(exact, Q.reference_linear(x, qw, b, act="fp32")) < 2e-5
            assert _rel(out, exact) < 0.05  # int8 activations: close to, not equal to, the exact path


@pytest.mark.parametrize("gs,k", [(64, 1088), (128, 384), (256, 768)])
def test_w4a8_row_path_bit_identical_to_blocked_path(ext, gs, k):
    """1-3 rows with fp16 scales take the one-row-at-a-time path; float32 scales (the same values)
    take the blocked path: same arithmetic in the same order, so bit-identical. The software
    prefetch distance changes nothing either."""
    g = torch.Generator().manual_seed(k)
    qw = F.quantize(torch.randn(45, k, generator=g) * 0.05, "int4", gs)
    bias = torch.randn(45, generator=g)
    sc, mn = qw["scales"], qw["mins"]
    assert sc.dtype == torch.float16 and mn.dtype == torch.float16
    for m in (1, 2, 3):
        x = torch.randn(m, k, generator=g)
        fast = ext.w4a8_gemm(x, qw["qweight"], sc, mn, gs, bias, 1)
        blocked = ext.w4a8_gemm(x, qw["qweight"], sc.float(), mn.float(), gs, bias, 1)
        assert torch.equal(fast, blocked), f"M={m}"
        try:
            ext._set_w4_prefetch(0)
            assert torch.equal(ext.w4a8_gemm(x, qw["qweight"], sc, mn, gs, bias, 1), fast)
        finally:
            ext._set_w4_prefetch(2048)


@pytest.mark.parametrize("gs,k", [(64, 576), (128, 384), (256, 768), (64, 2048)])
def test_w4a8_four_column_tiles_match_reference(ext, gs, k):
    """scales4 / mins4 (interleaved by 4 columns) switch 4+ rows to the 4-column tiles."""
    g = torch.Generator().manual_seed(3 * k + gs)
    n = 52
    qw = F.quantize(torch.randn(n, k, generator=g) * 0.05, "int4", gs)
    bias = torch.randn(n, generator=g)
    sc, mn = qw["scales"], qw["mins"]
    sc4 = sc.reshape(n // 4, 4, -1).transpose(1, 2).contiguous()
    mn4 = mn.reshape(n // 4, 4, -1).transpose(1, 2).contiguous()
    for m in (1, 3, 4, 5, 16, 17, 64):
        x = torch.randn(m, k, generator=g) * torch.logspace(-2, 1, m).unsqueeze(1)
        for b in (None, bias):
            ref = Q.reference_linear(x, qw, b, act="int8")
            out = ext.w4a8_gemm(x, qw["qweight"], sc, mn, gs, b, 1, sc4, mn4)
            assert _rel(out, ref) < 2e-5, f"M={m}"
    with pytest.raises(RuntimeError, match="needs mins4"):
        ext.w4a8_gemm(x, qw["qweight"], sc, mn, gs, None, 1, sc4, None)
    with pytest.raises(RuntimeError, match="float16"):
        ext.w4a8_gemm(x, qw["qweight"], sc, mn, gs, None, 1, sc4.float(), mn4)
    q97 = F.quantize(torch.randn(97, k, generator=g), "int4", gs)
    s97 = q97["scales"].reshape(-1)[: 96 * (k // gs)]  # any N % 4 != 0 is refused
    with pytest.raises(RuntimeError, match="N % 4"):
        ext.w4a8_gemm(x, q97["qweight"], q97["scales"], q97["mins"], gs, None, 1, s97, s97)


def test_linear_builds_tile_scales_once_and_after_changes(ext, monkeypatch):
    monkeypatch.setattr(Q, "TILES", True)
    torch.manual_seed(5)
    qw = F.quantize(torch.randn(40, 576) * 0.05, "int4", 64)
    x = torch.randn(8, 576)
    assert Q._tile_params(qw, 3) == (None, None)  # below TILE_MIN_M
    sc4, mn4 = Q._tile_params(qw, 8)
    assert sc4 is not None and Q._tile_params(qw, 8)[0] is sc4  # cached per scales tensor
    assert torch.equal(sc4[1, 2], qw["scales"][4:8, 2])  # [N/4, G, 4]: tile 1, group 2, columns 4..7
    y0 = Q.linear(x, qw, act="int8")
    assert _rel(y0, Q.reference_linear(x, qw, act="int8")) < 2e-5
    qw["scales"].mul_(2)  # in place: the copy is rebuilt (version counter)
    assert Q._tile_params(qw, 8)[0] is not sc4
    assert _rel(Q.linear(x, qw, act="int8"), Q.reference_linear(x, qw, act="int8")) < 2e-5
    big = F.quantize(torch.randn(8, 2048) * 0.05, "int4", 64)
    assert Q._tile_params(big, 8) == (None, None)  # K > TILE_MAX_K: the column kernel is faster there
    monkeypatch.setattr(Q, "TILES", False)
    assert Q._tile_params(qw, 8) == (None, None)


def test_int4_act_int8_same_as_w4a8_format(ext):
    """Same codes in two layouts: int4 + int8 activations == the w4a8 format."""
    torch.manual_seed(1)
    w = torch.randn(50, 256) * 0.05
    x = torch.randn(6, 256)
    a = Q.linear(x, F.quantize(w, "int4", 64), act="int8")
    b = Q.linear(x, F.quantize(w, "w4a8", 64))
    assert _rel(a, b) < 1e-5


def test_int4_act_policy(ext, monkeypatch):
    torch.manual_seed(2)
    qw = F.quantize(torch.randn(40, 128), "int4", 64)
    x = torch.randn(3, 128)
    monkeypatch.setattr(Q, "INT4_ACT", "int8")
    assert torch.equal(Q.linear(x, qw), Q.linear(x, qw, act="int8"))
    assert torch.equal(Q.reference_linear(x, qw), Q.reference_linear(x, qw, act="int8"))
    monkeypatch.setattr(Q, "INT4_A8_MAX_M", 2)  # M=3 above the threshold -> exact
    assert torch.equal(Q.linear(x, qw), Q.linear(x, qw, act="fp32"))
    monkeypatch.setattr(Q, "INT4_ACT", "fp32")
    monkeypatch.setattr(Q, "INT4_A8_MAX_M", 64)
    assert torch.equal(Q.linear(x, qw), Q.linear(x, qw, act="fp32"))
    q32 = F.quantize(torch.randn(40, 128), "int4", 32)  # whole-block groups only
    with pytest.raises(ValueError, match="multiple of 64"):
        Q.linear(x, q32, act="int8")
    with pytest.raises(ValueError, match="act must be"):
        Q.linear(x, qw, act="int4")
    with pytest.raises(RuntimeError, match="layout 1"):
        ext.w4a8_gemm(x, q32["qweight"], q32["scales"], q32["mins"], 32, None, 1)


def test_quantlinear_cached_dispatch(ext, monkeypatch):
    from llmopt.quant.linear import QuantLinear

    torch.manual_seed(3)
    lin = torch.nn.Linear(192, 33)
    q = QuantLinear.from_linear(lin, "int4", 64)
    for act in ("int8", "fp32"):
        monkeypatch.setattr(Q, "INT4_ACT", act)
        for m in (1, 4, 70):
            x = torch.randn(m, 192)
            assert torch.equal(q(x), Q.linear(x, q.qweight_packed, q.bias))
    x3 = torch.randn(2, 3, 192)
    assert torch.equal(q(x3), Q.linear(x3, q.qweight_packed, q.bias))
    # replacing a packed tensor or the bias drops the cached dispatch
    x = torch.randn(2, 192)
    q.bias = torch.zeros(33)
    assert torch.equal(q(x), Q.linear(x, q.qweight_packed, None))
    other = QuantLinear.from_linear(torch.nn.Linear(192, 33), "int4", 64)
    q.load_state_dict(other.state_dict())
    assert torch.equal(q(x), other(x))
    q.qweight = other.qweight.clone()
    assert torch.equal(q(x), other(x))


_PARALLEL_CHECK = r"""
import torch
from llmopt.kernels import qlinear as Q
from llmopt.formats import layouts as F
torch.set_num_threads(2)
worst = 0.0
for fmt, gs, k in [("int4", 64, 192), ("int8", 32, 96), ("w8a8", None, 100), ("w4a8", 64, 192), ("int3", 128, 384)]:
    g = torch.Generator().manual_seed(k)
    w = torch.randn(300, k, generator=g) * 0.05
    qw = F.quantize(w, fmt, gs)
    for m in (1, 5, 33):
        x = torch.randn(m, k, generator=g)
        got = Q.linear(x, qw, backend="native")
        ref = Q.reference_linear(x, qw, act="int8") if fmt == "int4" and Q.INT4_ACT == "int8" else Q.reference_linear(x, qw)
        worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
print(worst)
"""


def test_native_matches_reference_on_the_threaded_path(ext):
    """The tests above are small enough to run on the calling thread (LLMOPT_QGEMM_MIN_PAR); this one
    forces every call through the 2-thread column split, in a fresh process (the setting is read once)."""
    import subprocess
    import sys

    env = dict(os.environ, LLMOPT_QGEMM_MIN_PAR="0")
    out = subprocess.run([sys.executable, "-c", _PARALLEL_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 2e-3


_PREFETCH_ENV_CHECK = r"""
import logging, torch
logging.basicConfig(level=logging.WARNING)
from llmopt.kernels import qlinear as Q
from llmopt.formats import layouts as F
torch.manual_seed(0)
qw = F.quantize(torch.randn(64, 640) * 0.05, "int4", 64)
x = torch.randn(1, 640)
print(repr(Q.linear(x, qw, act="int8").sum().item()))
"""


def test_w4_prefetch_env(ext):
    """LLMOPT_W4_PREFETCH sets the int4 prefetch distance at load (results unchanged); a value that
    is not a number of bytes warns and keeps the default."""
    import subprocess
    import sys

    outs = {}
    for v in ("0", "4096", "lots"):
        env = dict(os.environ, LLMOPT_W4_PREFETCH=v)
        p = subprocess.run([sys.executable, "-c", _PREFETCH_ENV_CHECK], env=env, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        outs[v] = p.stdout.strip().splitlines()[-1]
        assert ("not a whole number of bytes" in p.stderr) == (v == "lots")
    assert len(set(outs.values())) == 1, outs
