"""Packed fp32 small-M GEMM (llmopt_sgemm) and PackedLinear vs F.linear."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmopt.kernels import build
from llmopt.kernels import dense as D

NATIVE_OFF = os.environ.get("LLMOPT_NATIVE", "1") in ("0", "false", "no")


@pytest.fixture(scope="module")
def ext():
    if NATIVE_OFF:
        pytest.skip("LLMOPT_NATIVE=0")
    mod = D.native_module()
    if mod is None:
        pytest.skip("llmopt_sgemm did not build (see the llmopt warning in the log)")
    return mod


@pytest.fixture
def threads():
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


@pytest.mark.skipif(not build.cpu_has_avx2() or NATIVE_OFF, reason="CPU without AVX2/FMA or LLMOPT_NATIVE=0")
def test_native_extension_builds_on_avx2():
    assert D.native_module() is not None, "llmopt_sgemm failed to build on an AVX2 machine"


def _check(y, ref, k):
    # fp32 dot products of length k with different summation order: error ~ sqrt(k) eps |x||w|
    tol = 1e-5 * max(1.0, k ** 0.5) * ref.abs().max().clamp_min(1.0).item()
    assert y.shape == ref.shape and y.dtype == ref.dtype
    err = (y - ref).abs().max().item()
    assert err <= tol, f"max abs error {err} > {tol}"


@pytest.mark.parametrize("k", [1, 3, 31, 577])
@pytest.mark.parametrize("n", [1, 7, 15, 17, 100])
def test_pack_layout_and_roundtrip(ext, n, k):
    w = torch.randn(n, k)
    p = ext.pack(w)
    assert p.shape == ((n + 15) // 16, k, 16)
    assert torch.equal(p, D.pack_weight_ref(w))
    assert torch.equal(D.unpack_weight(p, n), w)
    # explicit layout: packed[p][k][j] = W[16 p + j][k], zero padding
    assert p[(n - 1) // 16, k - 1, (n - 1) % 16] == w[n - 1, k - 1]
    if n % 16:
        assert (p[-1, :, n % 16:] == 0).all()


MS = [1, 2, 3, 5, 7, 16, 17, 33, 64]  # every register-tile height 1..6 and several tiles per panel
# (N, K): odd N (tail panels) and odd K; with 2 threads (17, 577) x M >= 33 takes the row-split
# path (2 panels, many rows) and (100, 577) the panel split with stealing
SHAPES = [(1, 1), (7, 3), (15, 31), (17, 577), (100, 31), (100, 577), (33, 1)]


@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_matches_linear(ext, threads, nthreads, with_bias):
    threads(nthreads)
    g = torch.Generator().manual_seed(nthreads * 2 + with_bias)
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g)
        b = torch.randn(n, generator=g) if with_bias else None
        p = ext.pack(w)
        for m in MS:
            x = torch.randn(m, k, generator=g)
            _check(ext.gemm(x, p, n, b), F.linear(x, w, b), k)


def test_gemm_parallel_path_large(ext, threads):
    """Big enough for the OpenMP path (and the stealing scheduler) with tail panels."""
    threads(2)
    g = torch.Generator().manual_seed(7)
    n, k = 1000, 300
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    p = ext.pack(w)
    for m in (1, 6, 13):
        x = torch.randn(m, k, generator=g)
        _check(ext.gemm(x, p, n, b), F.linear(x, w, b), k)
    for steal, chunk in ((0, 4), (1, 1), (1, 4)):
        ext._set_schedule(steal, chunk)
        try:
            x = torch.randn(5, k, generator=g)
            _check(ext.gemm(x, p, n, b), F.linear(x, w, b), k)
        finally:
            ext._set_schedule(1, 4)


def test_gemm_bad_input_messages(ext):
    w = torch.randn(20, 8)
    p = ext.pack(w)
    with pytest.raises(RuntimeError, match="features"):
        ext.gemm(torch.randn(2, 9), p, 20, None)
    with pytest.raises(RuntimeError, match="does not match"):
        ext.gemm(torch.randn(2, 8), p, 40, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.gemm(torch.randn(8, 2).t(), p, 20, None)
    with pytest.raises(RuntimeError, match="bias"):
        ext.gemm(torch.randn(2, 8), p, 20, torch.randn(19))
    with pytest.raises(RuntimeError, match="float32"):
        ext.pack(w.double())


def test_packed_linear_op_and_reference(ext):
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(37, 45, generator=g), torch.randn(37, generator=g)
    p = D.pack_weight(w)
    x = torch.randn(2, 3, 45, generator=g)  # leading dims
    ref = F.linear(x, w, b)
    _check(D.packed_linear(x, p, 37, b), ref, 45)
    _check(D.packed_linear_ref(x, p, 37, b), ref, 45)
    xt = torch.randn(45, 4, generator=g).t()  # non-contiguous input
    _check(D.packed_linear(xt, p, 37, b), F.linear(xt, w, b), 45)


def test_packed_linear_module(ext):
    g = torch.Generator().manual_seed(4)
    lin = nn.Linear(50, 23)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(23, 50, generator=g))
    pl = D.PackedLinear.from_linear(lin)
    assert pl.packed.shape == (2, 50, 16) and torch.equal(pl.weight, lin.weight)
    assert list(dict(pl.named_parameters())) == ["bias"]
    with torch.no_grad():
        for m in (1, 8, 9, 40):
            x = torch.randn(m, 50, generator=g)
            _check(pl(x), lin(x), 50)
    # grad mode on, nothing requires grad: still fine; x requiring grad: reference path, gradients flow
    x = torch.randn(2, 50, requires_grad=True)
    pl(x).sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.detach().sum(0).expand(2, -1))
    # state dict has nn.Linear's keys and round-trips through a plain nn.Linear
    sd = pl.state_dict()
    assert set(sd) == {"weight", "bias"} and torch.equal(sd["weight"], lin.weight)
    lin2 = nn.Linear(50, 23)
    lin2.load_state_dict(sd)
    pl2 = D.PackedLinear(torch.zeros(23, 50), torch.zeros(23))
    pl2.load_state_dict(lin.state_dict())
    x = torch.randn(3, 50, generator=g)
    with torch.no_grad():
        _check(pl2(x), lin(x), 50)
        _check(lin2(x), lin(x), 50)
    with pytest.raises(RuntimeError, match="size mismatch"):
        pl2.load_state_dict({"weight": torch.zeros(5, 5), "bias": torch.zeros(23)})
    # assigning .weight (re-tying) re-packs
    w3 = torch.randn(23, 50, generator=g)
    pl2.weight = nn.Parameter(w3)
    assert torch.equal(pl2.weight, w3)
    with pytest.raises(ValueError, match="shape"):
        pl2.weight = torch.zeros(50, 23)
    # other dtype -> reference path on the cast packed buffer
    pd = D.PackedLinear.from_linear(lin).double()
    xd = torch.randn(2, 50, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(pd(xd), F.linear(xd, lin.weight.double(), lin.bias.double()))


class _Tiny(nn.Module):
    def __init__(self, vocab=61, d=40, ff=70):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, ff)
        self.down = nn.Linear(ff, d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.down(F.silu(self.up(h)))
        return self.lm_head(h)


def test_pack_linears_tiny_model_same_logits(ext):
    torch.manual_seed(5)
    model = _Tiny().eval()
    ids = torch.randint(0, 61, (3,))
    with torch.no_grad():
        ref = model(ids)
        n = D.pack_linears(model)
        assert n == 3
        assert isinstance(model.up, D.PackedLinear) and isinstance(model.lm_head, D.PackedLinear)
        assert torch.equal(model.lm_head.weight, model.embed.weight)  # same values, embedding untouched
        out = model(ids)
        _check(out, ref, 70)
        # the embedding still works and the module names / state dict are unchanged
        assert torch.equal(model.embed(ids), model.embed.weight[ids])
        assert D.pack_linears(model) == 0  # already packed
    m2 = _Tiny()
    assert D.pack_linears(m2, skip=("lm_head",)) == 2 and type(m2.lm_head) is nn.Linear


def test_fallback_without_native(monkeypatch):
    """LLMOPT_NATIVE=0: no extension, pack_linears is a no-op, PackedLinear / packed_linear use torch
    (also for a module packed while the extension was on)."""
    packed_before = D.PackedLinear.from_linear(nn.Linear(19, 5)) if not NATIVE_OFF else None
    monkeypatch.setenv("LLMOPT_NATIVE", "0")

    class _NoNative:  # any use of the compiled module from here on fails the test
        def __getattr__(self, name):
            raise AssertionError(f"native {name} called with LLMOPT_NATIVE=0")

    monkeypatch.setattr(D, "_ext", _NoNative())
    assert D.native_module() is None and not D.native_available()
    torch.manual_seed(6)
    lin = nn.Linear(19, 5)
    x = torch.randn(3, 19)
    with torch.no_grad():
        pl = D.PackedLinear.from_linear(lin)
        _check(pl(x), lin(x), 19)
        torch.testing.assert_close(pl.weight, lin.weight)
        m = nn.Sequential(nn.Linear(19, 5))
        assert D.pack_linears(m) == 0 and type(m[0]) is nn.Linear
        p = D.pack_weight(lin.weight)
        assert torch.equal(p, D.pack_weight_ref(lin.weight))
        _check(D.packed_linear(x, p, 5, lin.bias), lin(x), 19)
        if packed_before is not None:
            ref = F.linear(x, packed_before.weight, packed_before.bias)
            _check(packed_before(x), ref, 19)


@pytest.mark.parametrize("n", [48, 37])
def test_pack_add_lowrank_equals_packing_the_merged_weight(n):
    """A LoRA update added in the packed layout equals packing ``W + scale * B @ A`` (padded rows of a
    last partial panel stay zero); a module made on it computes the merged linear."""
    g = torch.Generator().manual_seed(n)
    k, r = 40, 4
    w, a, b = torch.randn(n, k, generator=g), torch.randn(r, k, generator=g), torch.randn(n, r, generator=g)
    got = D.pack_add_lowrank(D.pack_weight(w), b, a, 0.5)
    want = D.pack_weight(w + 0.5 * (b @ a))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.all(got[-1, :, n - 16 * (got.shape[0] - 1):] == 0)  # padding rows of the last panel
    bias = torch.randn(n, generator=g)
    mod = D.PackedLinear.from_packed(got, n, bias)
    x = torch.randn(3, k, generator=g)
    torch.testing.assert_close(mod(x), F.linear(x, w + 0.5 * (b @ a), bias), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit the packed weight"):
        D.pack_add_lowrank(D.pack_weight(w), b[:, :2], a, 0.5)
    with pytest.raises(ValueError, match="is not the packed layout of 70 output rows"):
        D.PackedLinear.from_packed(got, 70)
