"""Native fused kernels vs their plain-torch references (and the references vs plain torch)."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llmopt.kernels import build, ops
from tests.conftest import native_or_skip

RTOL = 1e-5
ATOL = 1e-5

# The references, captured before any test monkeypatches the module.
rms_norm_ref = ops.rms_norm_ref
add_rms_norm_ref = ops.add_rms_norm_ref
silu_mul_ref = ops.silu_mul_ref
rope_ref_ = ops.rope_ref_
paged_decode_attention_ref = ops.paged_decode_attention_ref


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx2" in f.read()
    except OSError:
        return False


@pytest.fixture(scope="module")
def ext():
    return native_or_skip(ops._native(), "llmopt_fused")


@pytest.fixture
def no_ref():
    """``with no_ref(): ...`` makes every ops.*_ref raise, so a public op provably took the native path."""

    def boom(*a, **k):
        raise AssertionError("public op fell back to the reference")

    @contextlib.contextmanager
    def guard():
        with pytest.MonkeyPatch.context() as mp:
            for name in ("rms_norm_ref", "add_rms_norm_ref", "silu_mul_ref", "rope_ref_", "paged_decode_attention_ref"):
                mp.setattr(ops, name, boom)
            yield

    return guard


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------------
# build
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not _cpu_has_avx2(), reason="CPU has no AVX2: the native build is expected to be skipped")
@pytest.mark.skipif(not build.native_enabled(), reason="LLMOPT_NATIVE=0 set: native kernels disabled on purpose")
def test_native_builds_on_avx2_machine():
    assert ops.native_available(), "llmopt_fused failed to build on an AVX2 machine (see llmopt warning)"


def test_env_switch_disables_native():
    code = "from llmopt.kernels import ops; print(ops.native_available())"
    env = dict(os.environ, LLMOPT_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


# ------------------------------------------------------------------------------------------------
# 1. rms_norm
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", [576, 577, 4096, 5])
@pytest.mark.parametrize("tokens", [1, 37])
def test_rms_norm_native_matches_ref(ext, no_ref, tokens, hidden):
    g = gen(hidden * 100 + tokens)
    x = torch.randn(tokens, hidden, generator=g) * 3
    w = torch.randn(hidden, generator=g)
    with no_ref():
        got = ops.rms_norm(x, w, 1e-6)
    close(got, rms_norm_ref(x, w, 1e-6))
    close(got, _rms_norm_hf(x, w, 1e-6))
    close(ext.rms_norm(x, w, 1e-6), got, rtol=0, atol=0)


def _rms_norm_hf(x, w, eps):
    # transformers LlamaRMSNorm.forward, verbatim
    input_dtype = x.dtype
    hidden_states = x.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return w * hidden_states.to(input_dtype)


def test_rms_norm_ref_is_hf_and_handles_bf16():
    g = gen(1)
    x = (torch.randn(2, 3, 64, generator=g) * 4).bfloat16()
    w = torch.randn(64, generator=g).bfloat16()
    out = ops.rms_norm(x, w, 1e-5)  # bf16 -> reference path
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _rms_norm_hf(x, w, 1e-5))


def test_rms_norm_3d_and_noncontiguous(ext, no_ref):
    g = gen(2)
    x = torch.randn(3, 700, generator=g)[:, :577]  # strided rows
    w = torch.randn(577, generator=g)
    x3 = torch.randn(2, 5, 577, generator=g)
    with no_ref():
        y, y3 = ops.rms_norm(x, w, 1e-6), ops.rms_norm(x3, w, 1e-6)
    close(y, _rms_norm_hf(x, w, 1e-6))
    close(y3, _rms_norm_hf(x3, w, 1e-6))


# ------------------------------------------------------------------------------------------------
# 2. add_rms_norm
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", [577, 896, 4096])
@pytest.mark.parametrize("tokens", [1, 37])
def test_add_rms_norm_native_matches_ref(ext, no_ref, tokens, hidden):
    g = gen(hidden + tokens)
    x = torch.randn(tokens, hidden, generator=g)
    res = torch.randn(tokens, hidden, generator=g) * 2
    w = torch.randn(hidden, generator=g)
    x0, res0 = x.clone(), res.clone()
    with no_ref():
        normed, summed = ops.add_rms_norm(x, res, w, 1e-6)
    assert summed.data_ptr() == res.data_ptr(), "summed must be written into residual in place"
    assert torch.equal(x, x0), "x must not be modified"
    want_sum = res0 + x0
    close(summed, want_sum, rtol=0, atol=0)
    close(normed, _rms_norm_hf(want_sum, w, 1e-6))
    res_r = res0.clone()
    normed_r, summed_r = add_rms_norm_ref(x0, res_r, w, 1e-6)
    close(normed, normed_r)
    close(summed, summed_r, rtol=0, atol=0)


def test_add_rms_norm_ref_contract():
    g = gen(3)
    x, res, w = torch.randn(4, 33, generator=g), torch.randn(4, 33, generator=g), torch.randn(33, generator=g)
    res0 = res.clone()
    normed, summed = ops.add_rms_norm_ref(x, res, w, 1e-6)
    assert summed is res and torch.equal(res, res0 + x)
    assert torch.equal(normed, _rms_norm_hf(res0 + x, w, 1e-6))
    # autograd recording: no in-place write, gradients flow
    xg = x.clone().requires_grad_()
    res2 = res0.clone()
    normed, summed = ops.add_rms_norm(xg, res2, w, 1e-6)
    assert torch.equal(res2, res0)
    normed.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


# ------------------------------------------------------------------------------------------------
# 3. silu_mul
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 577), (37, 1536), (2, 5, 64), (3, 4864), (1, 7)])
def test_silu_mul_native_matches_ref(ext, no_ref, shape):
    g = gen(sum(shape))
    *lead, inter = shape
    gate_up = torch.randn(*lead, 2 * inter, generator=g) * 4
    gate_up.view(-1)[:5] = torch.tensor([-100.0, 100.0, -20.0, 0.0, 89.0])  # exp range ends
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate) * up
    with no_ref():
        got = ops.silu_mul(gate_up)
    assert got.shape == (*lead, inter)
    close(got, want)
    close(got, silu_mul_ref(gate_up))
    close(silu_mul_ref(gate_up), want, rtol=0, atol=0)


def test_silu_mul_nonfinite(ext):
    gu = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1.0] * 4 + [2.0] * 16])
    got, want = ext.silu_mul(gu), ops.silu_mul_ref(gu)
    assert torch.equal(got.isnan(), want.isnan())
    fin = want.isfinite()
    close(got[fin], want[fin])


# ------------------------------------------------------------------------------------------------
# 4. rope_
# ------------------------------------------------------------------------------------------------


def _cos_sin_cache(max_pos: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _rope_hf(x, positions, cache):
    # transformers apply_rotary_pos_emb with emb = cat(freqs, freqs), x: [T, H, D]
    half = x.shape[-1] // 2
    cos = torch.cat((cache[positions, :half],) * 2, -1)[:, None, :]
    sin = torch.cat((cache[positions, half:],) * 2, -1)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _qkv_views(tokens, hq, hk, d, g):
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, generator=g)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(tokens, hk, d)
    return qkv, q, k


@pytest.mark.parametrize("head_dim", [64, 128, 36])
@pytest.mark.parametrize("tokens", [1, 37])
def test_rope_native_matches_ref_on_fused_qkv_views(ext, no_ref, tokens, head_dim):
    g = gen(tokens * 1000 + head_dim)
    hq, hk, max_pos = 9, 3, 4096
    cache = _cos_sin_cache(max_pos, head_dim)
    positions = torch.randint(0, max_pos, (tokens,), generator=g)
    qkv, q, k = _qkv_views(tokens, hq, hk, head_dim, g)
    assert tokens == 1 or not q.is_contiguous()
    qkv0 = qkv.clone()
    want_q = _rope_hf(q.clone(), positions, cache)
    want_k = _rope_hf(k.clone(), positions, cache)
    with no_ref():
        assert ops.rope_(q, k, positions, cache) is None
    close(q, want_q)
    close(k, want_k)
    assert torch.equal(qkv[:, (hq + hk) * head_dim :], qkv0[:, (hq + hk) * head_dim :]), "v must be untouched"
    # the reference on the same views agrees too
    qkv_r = qkv0.clone()
    q_r = qkv_r[:, : hq * head_dim].view(tokens, hq, head_dim)
    k_r = qkv_r[:, hq * head_dim : (hq + hk) * head_dim].view(tokens, hk, head_dim)
    rope_ref_(q_r, k_r, positions, cache)
    close(qkv, qkv_r)


def test_rope_rejects_out_of_range_position(ext):
    cache = _cos_sin_cache(8, 64)
    q, k = torch.randn(2, 2, 64), torch.randn(2, 1, 64)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.rope_(q, k, torch.tensor([0, 8]), cache)


# ------------------------------------------------------------------------------------------------
# 5. paged_decode_attention
# ------------------------------------------------------------------------------------------------


def _paged_case(seed, head_dim, context_lens, block_size=16, hq=9, hk=3, pad=-1):
    """Random paged cache: each sequence gets blocks drawn from a permuted pool (with spare blocks)."""
    g = gen(seed)
    B = len(context_lens)
    nblocks_per = [math.ceil(n / block_size) for n in context_lens]
    max_blocks = max(nblocks_per) + 1
    num_blocks = sum(nblocks_per) + 7
    perm = torch.randperm(num_blocks, generator=g)
    block_tables = torch.full((B, max_blocks), pad, dtype=torch.int32)
    used = 0
    for b, nb in enumerate(nblocks_per):
        block_tables[b, :nb] = perm[used : used + nb].int()
        used += nb
    k_cache = torch.randn(num_blocks, block_size, hk, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, hk, head_dim, generator=g)
    q = torch.randn(B, hq, head_dim, generator=g)
    return q, k_cache, v_cache, block_tables, torch.tensor(context_lens, dtype=torch.int32)


def _sdpa_per_sequence(q, k_cache, v_cache, block_tables, context_lens, scale, window=None):
    B, Hq, D = q.shape
    BS, Hk = k_cache.shape[1], k_cache.shape[2]
    outs = []
    for b in range(B):
        n = int(context_lens[b])
        t = torch.arange(n)
        if window is not None:
            t = t[max(0, n - window) :]
        blocks = block_tables[b].long()[t // BS]
        k = k_cache[blocks, t % BS].permute(1, 0, 2).repeat_interleave(Hq // Hk, dim=0)  # [Hq, L, D]
        v = v_cache[blocks, t % BS].permute(1, 0, 2).repeat_interleave(Hq // Hk, dim=0)
        outs.append(F.scaled_dot_product_attention(q[b][:, None, :], k, v, scale=scale)[:, 0])
    return torch.stack(outs)


LENS = [1, 17, 37, 100, 64]


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_paged_attention_ref_matches_sdpa(head_dim, window):
    case = _paged_case(7, head_dim, LENS)
    scale = head_dim**-0.5
    got = ops.paged_decode_attention_ref(*case, scale, window)
    close(got, _sdpa_per_sequence(*case, scale, window))


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("head_dim", [64, 128, 40, 36])
def test_paged_attention_native_matches_ref(ext, no_ref, head_dim, window):
    case = _paged_case(head_dim, head_dim, LENS)
    scale = head_dim**-0.5
    with no_ref():
        got = ops.paged_decode_attention(*case, scale, window)
    close(got, paged_decode_attention_ref(*case, scale, window))
    close(got, _sdpa_per_sequence(*case, scale, window))


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("window", [None, 50])
def test_paged_attention_native_split_path(ext, splits, window):
    # the flash-decoding split/merge path (auto-selected only when pairs < threads)
    case = _paged_case(11, 64, [300, 1, 129, 0, 77], block_size=16, hq=8, hk=1)
    scale = 0.125
    want = paged_decode_attention_ref(*case, scale, window)
    sw = -1 if window is None else window
    close(ext.paged_decode_attention(*case, scale, sw, splits), want)
    close(ext.paged_decode_attention(*case, scale, sw, 0), want)
    # one (sequence, kv head) pair on 2+ threads: auto mode picks splits for the 300-token context
    one = (case[0][:1], case[1], case[2], case[3][:1], case[4][:1])
    close(ext.paged_decode_attention(*one, scale, sw, 0), paged_decode_attention_ref(*one, scale, window))


@pytest.mark.parametrize("block_size", [1, 5, 32])
def test_paged_attention_block_sizes_and_mha(ext, block_size):
    case = _paged_case(block_size, 64, [3, 33, 70], block_size=block_size, hq=4, hk=4)
    close(ops.paged_decode_attention(*case, 0.2), _sdpa_per_sequence(*case, 0.2))


def test_paged_attention_empty_context_gives_zeros(ext):
    q, kc, vc, bt, cl = _paged_case(5, 64, [0, 5], hq=2, hk=1)
    want1 = _sdpa_per_sequence(q[1:], kc, vc, bt[1:], cl[1:], 0.125)[0]
    for fn in (ops.paged_decode_attention, paged_decode_attention_ref):
        out = fn(q, kc, vc, bt, cl, 0.125)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        close(out[1], want1)
    all_empty = fn(q, kc, vc, bt, torch.zeros(2, dtype=torch.int32), 0.125)
    assert torch.equal(all_empty, torch.zeros_like(q))


def test_paged_attention_rejects_bad_block(ext):
    q, kc, vc, bt, cl = _paged_case(6, 64, [20], hq=2, hk=1)
    bt[0, 1] = kc.shape[0] + 3
    with pytest.raises(RuntimeError, match="out of range"):
        ops.paged_decode_attention(q, kc, vc, bt, cl, 0.125)


# ------------------------------------------------------------------------------------------------
# fallback
# ------------------------------------------------------------------------------------------------


def test_fallback_without_native_equals_reference(monkeypatch):
    monkeypatch.setattr(ops, "_native", lambda: None)
    assert not ops.native_available()
    g = gen(9)
    x, res, w = torch.randn(37, 577, generator=g), torch.randn(37, 577, generator=g), torch.randn(577, generator=g)
    assert torch.equal(ops.rms_norm(x, w, 1e-6), ops.rms_norm_ref(x, w, 1e-6))

    r1, r2 = res.clone(), res.clone()
    n1, s1 = ops.add_rms_norm(x, r1, w, 1e-6)
    n2, s2 = ops.add_rms_norm_ref(x, r2, w, 1e-6)
    assert torch.equal(n1, n2) and torch.equal(s1, s2) and s1 is r1

    gu = torch.randn(37, 2 * 577, generator=g)
    assert torch.equal(ops.silu_mul(gu), ops.silu_mul_ref(gu))

    cache = _cos_sin_cache(512, 64)
    pos = torch.randint(0, 512, (37,), generator=g)
    qkv1, q1, k1 = _qkv_views(37, 9, 3, 64, g)
    qkv2 = qkv1.clone()
    q2, k2 = qkv2[:, : 9 * 64].view(37, 9, 64), qkv2[:, 9 * 64 : 12 * 64].view(37, 3, 64)
    ops.rope_(q1, k1, pos, cache)
    ops.rope_ref_(q2, k2, pos, cache)
    assert torch.equal(qkv1, qkv2)

    case = _paged_case(3, 64, LENS)
    assert torch.equal(ops.paged_decode_attention(*case, 0.125, 20), ops.paged_decode_attention_ref(*case, 0.125, 20))


def test_non_float32_inputs_use_reference(ext, monkeypatch):
    calls = []
    real = ops.silu_mul_ref
    monkeypatch.setattr(ops, "silu_mul_ref", lambda t: calls.append(t.dtype) or real(t))
    ops.silu_mul(torch.randn(2, 16).double())
    ops.silu_mul(torch.randn(2, 16))
    assert calls == [torch.float64]


def test_sliding_window_validation():
    case = _paged_case(4, 64, [5], hq=2, hk=1)
    with pytest.raises(ValueError):
        ops.paged_decode_attention(*case, 0.125, 0)
