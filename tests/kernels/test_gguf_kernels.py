"""Native GGUF block-type kernels (llmopt.kernels.gguf_linear) vs gguf.quants.dequantize + a matmul,
on every CPU path this machine runs (AVX-512 where present, and always the AVX2 floor)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import quants

from llmopt.kernels import build
from llmopt.kernels import gguf_linear as G
from tests.conftest import K_QUANT_SCALE_OFFSETS, k_quant_blocks

QT = gguf.GGMLQuantizationType
TYPES = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
IDS = [t.name for t in TYPES]
MS = [1, 2, 3, 4, 7, 16, 64, 200]
# K crosses the kernels' 256-wide k chunks and is not a multiple of them; N is not a multiple of the
# 16-column panel nor of the 4-panel group
SHAPE = {32: (37, 544), 256: (37, 768)}  # block size -> (N, K)
ROOT = Path(__file__).resolve().parents[2]


def random_blocks(qt: QT, n: int, k: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, bytes_per_row]: gguf.quants.quantize of random weights, or (types gguf cannot
    quantize: K-quants) random bytes with valid, small fp16 scales."""
    rng = np.random.default_rng(seed)
    if qt.name not in K_QUANT_SCALE_OFFSETS:
        return quants.quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), qt)
    return k_quant_blocks(n, k, qt, rng)


def case(qt: QT, seed: int = 0) -> tuple[G.GGUFPacked, torch.Tensor]:
    n, k = SHAPE[gguf.GGML_QUANT_SIZES[qt][0]]
    raw = random_blocks(qt, n, k, seed)
    w = torch.from_numpy(quants.dequantize(raw, qt).reshape(n, k).astype(np.float32))
    return G.pack_gguf(raw, qt, (n, k), name=f"test.{qt.name}"), w


@pytest.fixture(scope="module")
def paths() -> list[str]:
    if not build.native_enabled():
        pytest.skip("LLMOPT_NATIVE=0")
    ps = G.available_paths()
    if build.cpu_has_avx2():
        assert "avx2" in ps, "the AVX2 GGUF kernels did not build on an AVX2 machine (see the llmopt warning)"
    if not ps:
        pytest.skip("CPU without AVX2: no native GGUF path")
    return ps


@pytest.fixture
def parallel_always(paths):
    """Every call splits over the threads (the default keeps small problems on one thread)."""
    before = {p: G.native_module(p)._set_min_parallel_work(0) for p in paths}
    yield
    for p, w in before.items():
        G.native_module(p)._set_min_parallel_work(w)


@pytest.fixture
def threads():
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


def test_native_paths_report_their_instruction_set(paths):
    assert "avx2" in paths
    for p in paths:
        assert G.native_module(p).isa() == p
    assert G.cpu_path() in paths or os.environ.get("LLMOPT_CPU_PATH") == "reference"
    flags = G._cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        assert "avx512" in paths
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
        assert "avx512_vnni" in paths
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "amx_tile", "amx_int8"} <= flags:
        assert "avx512_amx" in paths, "an AMX CPU without the AMX path (did the OS refuse the tile state?)"


def test_layout_tables_agree_between_python_and_cpp(paths):
    for p in paths:
        mod = G.native_module(p)
        for qt in TYPES:
            assert mod.block_bytes(int(qt)) == G._TYPES[qt].block_bytes, (p, qt.name)


@pytest.mark.parametrize("qt", TYPES, ids=IDS)
def test_packed_weights_decode_bit_exact_to_gguf_dequantize(paths, qt):
    packed, w = case(qt)
    assert torch.equal(G.dequantize_packed(packed), w)  # torch decode of the layout
    for p in paths:
        assert torch.equal(G.native_dequantize(packed, p), w), p  # the kernels' own decoder


def _check_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, what: str) -> None:
    """|y - exact| <= K * 2^-23 * (|x| @ |w|.T): fp32 summation error of any order, nothing more."""
    exact = x.double() @ w.double().t()
    if bias is not None:
        exact = exact + bias.double()
    bound = x.shape[1] * 2.0 ** -23 * (x.double().abs() @ w.double().abs().t()) + 1e-30
    if bias is not None:
        bound = bound + bias.double().abs() * 2.0 ** -23
    excess = ((y.double() - exact).abs() / bound).max().item()
    assert excess <= 1.0, f"{what}: error {excess:.2f}x the fp32 summation bound"


@pytest.mark.parametrize("qt", TYPES, ids=IDS)
def test_linear_matches_dequantized_matmul_on_every_path(paths, parallel_always, threads, qt):
    packed, w = case(qt, seed=1)
    n, k = packed.shape
    g = torch.Generator().manual_seed(int(qt))
    xs = torch.randn(max(MS), k, generator=g)
    bias = torch.randn(n, generator=g)
    for p in paths:
        for nt in (1, 2):
            threads(nt)
            for m in MS:
                for b in (None, bias):
                    y = G.gguf_linear(xs[:m], packed, b, path=p)
                    assert y.shape == (m, n) and y.dtype == torch.float32
                    _check_close(y, xs[:m], w, b, f"{qt.name} path={p} threads={nt} M={m} bias={b is not None}")


@pytest.mark.parametrize("qt", TYPES, ids=IDS)
def test_rows_are_bit_identical_whatever_the_batch(paths, parallel_always, threads, qt):
    """Batch invariance: row i of an M-row call == row i computed alone, for every M, tile choice,
    thread count and instruction set (one fma chain per output in k order everywhere)."""
    packed, _ = case(qt, seed=2)
    n, k = packed.shape
    x = torch.randn(200, k, generator=torch.Generator().manual_seed(7))
    bias = torch.randn(n)
    threads(1)
    alone = torch.cat([G.gguf_linear(x[i:i + 1], packed, bias, path=paths[-1]) for i in range(x.shape[0])])
    for p in paths:
        for nt in (1, 2):
            threads(nt)
            for m in MS:
                for small_m in (0, 4, 1000):  # dequantized-panel path, default split, register tiles only
                    y = G.gguf_linear(x[:m], packed, bias, path=p, small_m=small_m)
                    assert torch.equal(y, alone[:m]), f"{qt.name} path={p} threads={nt} M={m} small_m={small_m}"


@pytest.mark.parametrize("qt", TYPES, ids=IDS)
def test_prompt_path_bits_over_partial_tiles_row_blocks_and_threads(paths, parallel_always, threads, qt):
    """The dequantized-panel (prompt) path packs the activations once per call, per row block of
    ~1 MiB (700 rows here: 2 or 3 blocks) and balanced row tile (12 rows on AVX-512, 6 on AVX2, so
    these row counts end in partial tiles), shared by the threads: every row count, both thread
    counts and both packing modes (the threads as they reach a block / the caller up front) give
    the register tiles' bits."""
    packed, _ = case(qt, seed=8)
    n, k = packed.shape
    g = torch.Generator().manual_seed(11)
    x = torch.randn(700, k, generator=g) * torch.logspace(-2, 1, k)
    bias = torch.randn(n, generator=g)
    threads(1)
    ref = G.gguf_linear(x, packed, bias, path=paths[-1], small_m=1000)  # register tiles only
    for p in paths:
        mod = G.native_module(p)
        try:
            for in_caller in (0, 1):
                mod._set_buf_pack_in_caller(in_caller)
                for nt in (1, 2):
                    threads(nt)
                    for m in (5, 11, 13, 23, 25, 37, 700):
                        y = G.gguf_linear(x[:m], packed, bias, path=p, small_m=0)
                        assert torch.equal(y, ref[:m]), f"{qt.name} path={p} caller={in_caller} threads={nt} M={m}"
        finally:
            mod._set_buf_pack_in_caller(0)


A8_TYPES = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]


def test_int8_mode_types():
    assert G.supported_types("int8") == [t.name for t in A8_TYPES]
    assert set(G.supported_types()) == set(IDS)


QUANT_ACTS = {"int8": (G.quantize_act_int8, 2e-2), "int16": (G.quantize_act_int16, 1e-4)}  # reference, error vs fp32


@pytest.mark.parametrize("act", list(QUANT_ACTS))
@pytest.mark.parametrize("qt", A8_TYPES, ids=[t.name for t in A8_TYPES])
def test_quantized_activations_match_the_quantized_activation_reference(paths, parallel_always, threads, qt, act):
    """act="int8" / "int16" == (x quantized per row and 32 k, dequantized) @ W.T up to float rounding, on
    every path; the integer sums are exact, so every path gives the same bits; rows are batch-invariant;
    and the result stays near the exact fp32 product (int8 ~0.5% relative error here, int16 ~2e-5)."""
    quantize, rel = QUANT_ACTS[act]
    packed, w = case(qt, seed=4)
    n, k = packed.shape
    g = torch.Generator().manual_seed(11)
    xs = torch.randn(max(MS), k, generator=g) * torch.logspace(-3, 1, max(MS)).unsqueeze(1)
    xs[5] = 0  # amax == 0: scale 0, codes 0
    bias = torch.randn(n, generator=g)
    xhat = quantize(xs)
    exact = xhat.double() @ w.double().t() + bias.double()
    sub = 16 if qt == QT.Q6_K else 32  # k per sub-block: one scaled fma (two with mins) each
    bound = (k // sub + 2) * 2.0 ** -22 * (xhat.double().abs() @ w.double().abs().t() + bias.double().abs())
    threads(1)
    alone = torch.cat([G.gguf_linear(xs[i:i + 1], packed, bias, act=act, path=paths[-1])
                       for i in range(xs.shape[0])])
    assert ((alone.double() - exact).abs() <= bound).all(), f"{qt.name}: {act} mode off the quantized reference"
    for p in paths:
        for nt in (1, 2):
            threads(nt)
            for m in MS:
                y = G.gguf_linear(xs[:m], packed, bias, act=act, path=p)
                assert torch.equal(y, alone[:m]), f"{qt.name} {act} path={p} threads={nt} M={m}"
    yr = G.gguf_linear(xs[:16], packed, bias, act=act, path="reference")
    assert ((yr.double() - exact[:16]).abs() <= bound[:16]).all()
    y32 = xs[:16].double() @ w.double().t() + bias.double()
    assert ((alone[:16].double() - y32).norm() / y32.norm()).item() < rel


_A8_CHILD = """
import sys, torch
from llmopt.kernels import gguf_linear as G
cases, out = torch.load(sys.argv[1]), {}
for name, (data, qt, shape, x) in cases.items():
    packed = G.GGUFPacked(qt, tuple(shape), data, name)
    alone = torch.cat([G.gguf_linear(x[i:i + 1], packed, act="int8") for i in range(x.shape[0])])
    for m in range(1, x.shape[0] + 1):
        assert torch.equal(G.gguf_linear(x[:m], packed, act="int8"), alone[:m]), (name, m)
    out[name] = alone
torch.save({"path": G.cpu_path(), "out": out}, sys.argv[2])
"""


def test_int8_mode_under_forced_avx2_gives_the_native_paths_bits(paths, tmp_path):
    """A fresh process with LLMOPT_CPU_PATH=avx2 (the path chosen at start-up, as a deployment on an
    AVX2-only CPU gets it): rows 1..16 batched == alone, and the same bits as this process's native
    path, for every int8 type."""
    cases, here = {}, {}
    for qt in A8_TYPES:
        packed, _ = case(qt, seed=6)
        x = torch.randn(16, packed.shape[1], generator=torch.Generator().manual_seed(int(qt)))
        cases[qt.name] = (packed.data, int(qt), list(packed.shape), x)
        here[qt.name] = G.gguf_linear(x, packed, act="int8", path=paths[0])
    torch.save(cases, tmp_path / "cases.pt")
    env = dict(os.environ, LLMOPT_CPU_PATH="avx2", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", _A8_CHILD, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
                       check=False, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["path"] == "avx2"
    for name, y in here.items():
        assert torch.equal(got["out"][name], y), f"{name}: avx2 process vs {paths[0]}"


@pytest.mark.parametrize("qt", A8_TYPES, ids=[t.name for t in A8_TYPES])
def test_amx_tiles_give_the_register_tiles_bits(paths, parallel_always, threads, qt):
    """The avx512_amx build runs the int8 mode's rows 16 at a time on AMX tiles (a short last tile
    padded with zero rows, or left to the VNNI register tiles below the row threshold): the same
    exact integer sums and float steps, so every row count and threshold gives the same bits."""
    if "avx512_amx" not in paths:
        pytest.skip("no AMX-INT8 here")
    mod = G.native_module("avx512_amx")
    packed, _ = case(qt, seed=7)
    n, k = packed.shape
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, k, generator=g) * torch.logspace(-2, 1, 40).unsqueeze(1)
    x[9] = 0
    bias = torch.randn(n, generator=g)
    default = mod._set_amx_min_rows(0)  # register tiles only
    try:
        ref = G.gguf_linear(x, packed, bias, act="int8", path="avx512_amx")
        for min_rows in (1, 8, 12, 16):
            mod._set_amx_min_rows(min_rows)
            for nt in (1, 2):
                threads(nt)
                for m in (1, 5, 8, 12, 16, 17, 31, 40):
                    y = G.gguf_linear(x[:m], packed, bias, act="int8", path="avx512_amx")
                    assert torch.equal(y, ref[:m]), f"{qt.name} min_rows={min_rows} threads={nt} M={m}"
    finally:
        mod._set_amx_min_rows(default)


A8_TYPES = [qt for qt in TYPES if qt.name in G.supported_types("int8")]


@pytest.fixture
def amx_bf16(paths):
    if "avx512_amx" not in paths or not G.bf16x3_available("avx512_amx"):
        pytest.skip("no AMX-BF16 here: act='bf16x3' does not run")
    return "avx512_amx"


@pytest.mark.parametrize("qt", A8_TYPES, ids=[t.name for t in A8_TYPES])
def test_bf16x3_matches_the_dequantized_matmul_and_is_batch_invariant(amx_bf16, parallel_always, threads, qt):
    """act="bf16x3" (fp32 activations as three bf16 parts on AMX-BF16 tiles): within the fp32 summation
    bound of the exact product, every row count (partial 16-row tiles, 1 thread or 2) gives each row
    the bits it gets alone, with and without a bias."""
    packed, w = case(qt, seed=3)
    n, k = packed.shape
    g = torch.Generator().manual_seed(11 + int(qt))
    x = torch.randn(max(MS), k, generator=g) * torch.logspace(-3, 2, k)[torch.randperm(k, generator=g)]
    bias = torch.randn(n, generator=g)
    threads(1)
    alone = torch.cat([G.gguf_linear(x[i:i + 1], packed, bias, act="bf16x3", path=amx_bf16) for i in range(len(x))])
    _check_close(alone - bias, x, w, None, f"{qt.name} bf16x3 rows alone")
    for nt in (1, 2):
        threads(nt)
        for m in MS:
            y = G.gguf_linear(x[:m], packed, bias, act="bf16x3", path=amx_bf16)
            assert torch.equal(y, alone[:m]), f"{qt.name} bf16x3 threads={nt} M={m}"
    fp32 = G.gguf_linear(x, packed, bias, path=amx_bf16)
    assert not torch.equal(fp32, alone), "bf16x3 gave the fp32 chain's bits: is it running?"


def test_bf16x3_splits_each_activation_exactly(amx_bf16):
    """Activations that need all 24 bits of fp32 (and tiny, huge, negative ones) against a weight of
    ones: each output is the row's exact sum up to the fp32 summation bound, which a two-part (16-bit)
    split would miss by ~2^-16."""
    qt = QT.Q8_0
    k, n = 64, 16
    raw = quants.quantize(np.ones((n, k), np.float32), qt)
    packed = G.pack_gguf(raw, qt, (n, k))
    w = torch.from_numpy(quants.dequantize(raw, qt).reshape(n, k).astype(np.float32))
    x = torch.zeros(3, k)
    x[0, 0] = 1 + 2.0 ** -23  # one 24-bit value, nothing else: exact sum
    x[1] = torch.linspace(-3e4, 3e4, k) * (1 + 2.0 ** -20)
    x[2] = torch.tensor([1e-30, -1e30, 1e30, 1.0] * 16)
    y = G.gguf_linear(x, packed, act="bf16x3", path=amx_bf16)
    assert y[0, 0].item() == (x[0, 0] * w[0, 0]).item()
    _check_close(y, x, w, None, "bf16x3 24-bit activations")


def test_bf16x3_is_refused_where_it_does_not_run(paths):
    packed, _ = case(QT.Q4_1)
    x = torch.randn(3, packed.shape[1])
    with pytest.raises(ValueError, match="bf16x3"):
        G.gguf_linear(x, packed, act="bf16x3", path="avx2")
    q2, _ = case(QT.Q2_K)
    with pytest.raises(ValueError, match="no bf16x3 kernel for Q2_K"):
        G.gguf_linear(torch.randn(3, q2.shape[1]), q2, act="bf16x3")
    assert not G.bf16x3_available("avx2")


def test_int8_mode_refuses_types_without_its_kernel(paths):
    packed, _ = case(QT.Q3_K)
    with pytest.raises(ValueError, match=r"'test.Q3_K' \(Q3_K, 37x768\): no int8-activation kernel for Q3_K"):
        G.gguf_linear(torch.randn(1, 768), packed, act="int8")
    with pytest.raises(ValueError, match=r"'test.Q3_K' \(Q3_K, 37x768\): no int16 kernel for Q3_K"):
        G.gguf_linear(torch.randn(1, 768), packed, act="int16")
    with pytest.raises(ValueError, match="act must be one of fp32, int8, int16, bf16x3"):
        G.gguf_linear(torch.randn(1, 768), packed, act="int4")


def test_reference_path_and_other_input_forms(paths):
    packed, w = case(QT.Q4_K, seed=3)
    n, k = packed.shape
    x = torch.randn(2, 5, k)
    bias = torch.randn(n)
    y = G.gguf_linear(x, packed, bias)
    assert y.shape == (2, 5, n)
    _check_close(y.reshape(10, n), x.reshape(10, k), w, bias, "3-D input")
    yr = G.gguf_linear(x, packed, bias, path="reference")
    _check_close(yr.reshape(10, n), x.reshape(10, k), w, bias, "reference path")
    yb = G.gguf_linear(x.to(torch.bfloat16), packed, bias)
    assert yb.dtype == torch.bfloat16 and yb.shape == (2, 5, n)


def test_out_receives_the_result_in_place(paths):
    """out=: the native kernels write a row range of a larger result in place (the by-kind linear's two
    runs); the bits are those of the call without out, on every path and act; other forms copy."""
    packed, _ = case(QT.Q4_1, seed=5)
    n, k = packed.shape
    x = torch.randn(9, k)
    bias = torch.randn(n)
    acts = ["fp32", "int8", "int16"] + (["bf16x3"] if G.bf16x3_available() else [])
    for path in [*paths, "reference"]:
        for act in acts if path == G.cpu_path() else ["fp32", "int8", "int16"]:
            want = G.gguf_linear(x, packed, bias, act=act, path=path)
            big = torch.full((12, n), float("nan"))
            got = G.gguf_linear(x[3:7], packed, bias, act=act, path=path, out=big[5:9])
            assert got.data_ptr() == big[5:9].data_ptr() and torch.equal(big[5:9], want[3:7]), (path, act)
            assert big[:5].isnan().all() and big[9:].isnan().all()  # nothing outside the range
    y3 = torch.empty(2, 2, n)
    assert torch.equal(G.gguf_linear(x[:4].reshape(2, 2, k), packed, bias, out=y3), y3)  # 3-D: copied
    with pytest.raises(RuntimeError):
        G.gguf_linear(x, packed, bias, out=torch.empty(8, n))  # wrong shape


@pytest.mark.parametrize("qt", [QT.Q4_1, QT.Q4_K, QT.Q5_0, QT.Q5_K, QT.Q6_K], ids=["Q4_1", "Q4_K", "Q5_0", "Q5_K", "Q6_K"])
def test_lane_major_planes_hold_each_code_where_the_kernels_read_it(qt):
    """4-bit low planes (TypeDesc::LM): low plane byte (g, c, i) = the nibbles of k = 8 g + 2 i, + 1 of
    column c; high plane one 32-bit lane per column and 32 / H k, bits 8 i + H (2 gg + h) .. = the
    high bits of k = 8 gg + 2 i + h (checked code by code against the GGUF blocks' own codes)."""
    t = G._TYPES[qt]
    assert t.lane_major
    n, k = 16, t.qb
    raw = random_blocks(qt, n, k, seed=5)
    codes = G._fields(t, raw.reshape(1, n, 1, -1))["q"][0, :, 0]  # [16, QB]
    data = G.pack_gguf(raw, qt, (n, k)).data[0, 0].numpy()
    off = dict(zip([s for s, _ in t.sections], np.cumsum([0] + [b for _, b in t.sections])))
    low, high = data[off["low"]:off["low"] + k * 8], data[off["low"] + k * 8:]
    kh = 32 // max(t.h, 1)
    for c in range(n):
        for kk in range(k):
            g, i, h = kk // 8, (kk % 8) // 2, kk % 2
            assert (low[64 * g + 4 * c + i] >> (4 * h)) & 15 == codes[c, kk] & 15, (c, kk)
            if not t.h:
                continue
            lane = int.from_bytes(high[64 * (kk // kh) + 4 * c:64 * (kk // kh) + 4 * c + 4].tobytes(), "little")
            gg = (kk % kh) // 8
            assert (lane >> (8 * i + t.h * (2 * gg + h))) & ((1 << t.h) - 1) == codes[c, kk] >> 4, (c, kk)


def test_embedding_rows_equal_gguf_dequantize():
    packed, w = case(QT.Q6_K, seed=5)
    ids = torch.tensor([[0, 36, 17], [17, 5, 36]])
    assert torch.equal(G.gguf_embedding(ids, packed), w[ids])
    with pytest.raises(ValueError, match=r"ids must be integers in \[0, 37\)"):
        G.gguf_embedding(torch.tensor([37]), packed)


def test_torch_tensor_and_flat_raw_pack_the_same(paths):
    raw = random_blocks(QT.Q5_1, 20, 64)
    a = G.pack_gguf(raw, QT.Q5_1, (20, 64))
    b = G.pack_gguf(torch.from_numpy(raw.reshape(-1).copy()), "q5_1", [20, 64])
    c = G.pack_gguf(raw, int(QT.Q5_1), (20, 64))
    assert torch.equal(a.data, b.data) and torch.equal(a.data, c.data)
    assert a.type_name == "Q5_1" and a.shape == (20, 64)


def test_bad_input_names_the_tensor_and_type():
    raw = random_blocks(QT.Q4_0, 8, 64)
    with pytest.raises(ValueError, match=r"'blk.0.ffn_up'.*F16.*no native kernel"):
        G.pack_gguf(np.zeros((8, 64), np.float16), QT.F16, (8, 64), name="blk.0.ffn_up")
    with pytest.raises(ValueError, match=r"'w'.*unknown GGML type 'Q9_9'"):
        G.pack_gguf(raw, "Q9_9", (8, 64), name="w")
    with pytest.raises(ValueError, match=r"'w' \(Q4_0, shape \(8, 32\)\): expected 144 bytes.*got 288"):
        G.pack_gguf(raw, QT.Q4_0, (8, 32), name="w")
    with pytest.raises(ValueError, match=r"'w' \(Q4_0\): in_features 48 is not a multiple of the block size 32"):
        G.pack_gguf(raw, QT.Q4_0, (12, 48), name="w")
    with pytest.raises(ValueError, match=r"'w' \(Q4_0\): shape must be 2-D"):
        G.pack_gguf(raw, QT.Q4_0, (2, 4, 64), name="w")
    packed = G.pack_gguf(raw, QT.Q4_0, (8, 64), name="w")
    with pytest.raises(ValueError, match=r"'w' \(Q4_0, 8x64\): x has shape \(3, 60\).*in_features = 64"):
        G.gguf_linear(torch.randn(3, 60), packed)
    with pytest.raises(ValueError, match=r"'w' \(Q4_0, 8x64\): x must be a floating-point tensor"):
        G.gguf_linear(torch.ones(3, 64, dtype=torch.int32), packed)
    with pytest.raises(ValueError, match=r"'w' \(Q4_0, 8x64\): bias has shape \(7,\), expected \(8,\)"):
        G.gguf_linear(torch.randn(3, 64), packed, torch.randn(7))
    with pytest.raises(ValueError, match="GGUFPacked"):
        G.gguf_linear(torch.randn(3, 64), raw)
    with pytest.raises(ValueError, match="unknown path 'sse2'"):
        G.gguf_linear(torch.randn(3, 64), packed, path="sse2")


def test_cpu_without_avx2_gets_the_reference_not_a_crash(monkeypatch, caplog):
    """A CPU reporting no AVX2: no native module is loaded, the torch reference runs, one warning."""
    monkeypatch.setattr(G, "_cpu_flags", lambda: frozenset({"sse2", "sse4_2"}))
    monkeypatch.setattr(G, "_modules", {})
    monkeypatch.setattr(G, "_chosen", None)
    monkeypatch.delenv("LLMOPT_CPU_PATH", raising=False)
    with caplog.at_level(logging.WARNING, logger=G.__name__):
        assert G.cpu_path() == "reference"
    if build.native_enabled():
        assert "plain-torch reference" in caplog.text
    assert G.available_paths() == []
    packed, w = case(QT.Q8_0)
    x = torch.randn(3, packed.shape[1])
    _check_close(G.gguf_linear(x, packed), x, w, None, "reference on a CPU without AVX2")
    with pytest.raises(ValueError, match="'avx2' is not available here"):
        G.gguf_linear(x, packed, path="avx2")


def _cpu_path_in_subprocess(env_value: str | None, native: str = "1") -> subprocess.CompletedProcess:
    env = dict(os.environ, LLMOPT_NATIVE=native, PYTHONPATH=str(ROOT))
    env.pop("LLMOPT_CPU_PATH", None)
    if env_value is not None:
        env["LLMOPT_CPU_PATH"] = env_value
    code = ("import logging; logging.basicConfig(level=logging.WARNING)\n"
            "from llmopt.kernels import gguf_linear as G\nprint('PATH', G.cpu_path())")
    return subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=600)


def test_env_override_forces_the_avx2_path(paths):
    r = _cpu_path_in_subprocess("avx2")
    assert r.returncode == 0, r.stderr
    assert "PATH avx2" in r.stdout
    r = _cpu_path_in_subprocess("fastest")  # not a path: warned, then chosen from the CPU
    assert r.returncode == 0, r.stderr
    assert f"PATH {paths[0]}" in r.stdout and "LLMOPT_CPU_PATH='fastest'" in r.stderr


def test_native_off_means_reference():
    r = _cpu_path_in_subprocess(None, native="0")
    assert r.returncode == 0, r.stderr
    assert "PATH reference" in r.stdout
