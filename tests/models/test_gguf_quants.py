"""Tests for llmopt.formats.gguf_quants against gguf's numpy reference (gguf.quants)."""

from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from llmopt.formats import gguf_quants as gq
from llmopt.formats.gguf_quants import (
    SUPPORTED,
    UnsupportedTensorType,
    dequantize,
    dequantize_tensor,
    q4_blocks,
)

# types gguf.quants can quantize (real blocks); the rest it can only dequantize
QUANTIZABLE = [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0]
BLOCK_TYPES = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]

# byte offsets of the fp16 fields (d, dmin/m) inside one block, from ggml-common.h
FP16_FIELDS = {
    QT.Q4_0: [0],
    QT.Q4_1: [0, 2],
    QT.Q5_0: [0],
    QT.Q5_1: [0, 2],
    QT.Q8_0: [0],
    QT.Q2_K: [80, 82],
    QT.Q3_K: [108],
    QT.Q4_K: [0, 2],
    QT.Q5_K: [0, 2],
    QT.Q6_K: [208],
}

ROWS = [1, 3, 7]
COLS = 512  # multiple of 256 so every block type fits


def assert_bitwise_equal(ours: torch.Tensor, ref: np.ndarray) -> None:
    assert ours.dtype == torch.float32
    ref = np.asarray(ref, dtype=np.float32)
    got = ours.numpy()
    assert got.shape == ref.shape
    if not np.array_equal(got.view(np.uint32), ref.view(np.uint32)):
        diff = np.abs(got.astype(np.float64) - ref)
        raise AssertionError(f"mismatch: {np.sum(got.view(np.uint32) != ref.view(np.uint32))} elements, max abs diff {np.nanmax(diff)}")


def random_blocks(qtype: QT, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random raw blocks [rows, bytes] with finite fp16 scales (all bit patterns elsewhere)."""
    rng = np.random.default_rng(seed)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block_size, type_size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        scale = (rng.uniform(-2.0, 2.0, size=raw.shape[:2]) * 10.0 ** rng.integers(-4, 1, size=raw.shape[:2]))
        raw[:, :, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def quantized(qtype: QT, rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 3.0, size=(rows, 1))).astype(np.float32)
    x[0, :40] = 0.0  # an all-zero block (d == 0) and a partially zero one
    return gguf.quants.quantize(x, qtype)


def test_supported_set():
    required = {QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K}
    assert required <= SUPPORTED
    assert set(BLOCK_TYPES) | {QT.F32, QT.F16, QT.BF16} == set(SUPPORTED)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_matches_gguf_on_quantized_data(qtype, rows):
    raw = quantized(qtype, rows, COLS, seed=rows)
    ref = gguf.quants.dequantize(raw, qtype)
    assert_bitwise_equal(dequantize(raw, qtype, (rows, COLS)), ref)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_matches_gguf_on_random_blocks(qtype, rows):
    raw = random_blocks(qtype, rows, COLS, seed=100 + rows)
    ref = gguf.quants.dequantize(raw, qtype)
    assert np.isfinite(ref).all()
    assert_bitwise_equal(dequantize(raw, qtype, (rows, COLS), name="w"), ref)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_chunk_boundaries_and_3d_shape(qtype, monkeypatch):
    # Tiny chunks so that chunk boundaries fall inside one tensor and the last chunk is
    # partial, both for the element loop (7 blocks of 32 / 1 block of 256 per chunk)
    # and for the per-block scale loops (224 // width blocks per chunk).
    monkeypatch.setattr(gq, "_CHUNK_ELEMENTS", 7 * 32)
    shape = (3, 5, 1024)
    raw = random_blocks(qtype, 15, 1024, seed=7).reshape(-1)  # flat bytes are accepted too
    ref = gguf.quants.dequantize(raw.reshape(15, -1), qtype).reshape(shape)
    assert_bitwise_equal(dequantize(raw, int(qtype), shape), ref)  # int type id accepted


def test_q4_0_hand_built_block():
    # d = 0.5; byte i holds element i (low nibble = i) and element i + 16 (high nibble = 15 - i)
    d = np.array([0.5], dtype=np.float16).view(np.uint8)
    qs = np.array([i | ((15 - i) << 4) for i in range(16)], dtype=np.uint8)
    raw = np.concatenate([d, qs])
    expected = [(i - 8) * 0.5 for i in range(16)] + [(15 - i - 8) * 0.5 for i in range(16)]
    assert dequantize(raw, QT.Q4_0, (1, 32)).flatten().tolist() == expected


def test_q4_1_and_q5_0_hand_built_blocks():
    d = np.array([0.25], dtype=np.float16).view(np.uint8)
    m = np.array([-1.0], dtype=np.float16).view(np.uint8)
    qs = np.array([i | ((15 - i) << 4) for i in range(16)], dtype=np.uint8)
    q41 = dequantize(np.concatenate([d, m, qs]), QT.Q4_1, (32,)).tolist()
    assert q41 == [i * 0.25 - 1.0 for i in range(16)] + [(15 - i) * 0.25 - 1.0 for i in range(16)]
    # Q5_0: qh is a little-endian uint32, bit j = 5th bit of element j; set it for odd j
    qh = np.array([0xAAAAAAAA], dtype="<u4").view(np.uint8)
    q50 = dequantize(np.concatenate([d, qh, qs]), QT.Q5_0, (32,)).tolist()
    nib = list(range(16)) + [15 - i for i in range(16)]
    assert q50 == [((nib[j] | (16 * (j % 2))) - 16) * 0.25 for j in range(32)]


def test_q8_0_hand_built_block():
    d = np.array([0.125], dtype=np.float16).view(np.uint8)
    qs = np.arange(-16, 16, dtype=np.int8).view(np.uint8)
    assert dequantize(np.concatenate([d, qs]), QT.Q8_0, (32,)).tolist() == [q * 0.125 for q in range(-16, 16)]


def test_result_is_an_owned_writable_copy():
    x = np.arange(64, dtype=np.float32).reshape(2, 32)
    y = dequantize(x, QT.F32, (2, 32))
    y += 1
    assert x[0, 0] == 0.0
    raw = quantized(QT.Q8_0, 2, 32, seed=0)
    before = raw.copy()
    dequantize(raw, QT.Q8_0, (2, 32)).mul_(2)
    assert np.array_equal(raw, before)


def test_gguf_file_roundtrip_shape_convention(tmp_path):
    rng = np.random.default_rng(1)
    f32 = rng.standard_normal((3, 64)).astype(np.float32)  # torch shape [out=3, in=64]
    f16 = rng.standard_normal((5, 32)).astype(np.float16)
    q_src = rng.standard_normal((7, 256)).astype(np.float32)
    k_src = random_blocks(QT.Q6_K, 2 * 3, 256, seed=3).reshape(2, 3, -1)  # 3-D, torch [2, 3, 256]
    q4_0 = gguf.quants.quantize(q_src, QT.Q4_0)
    q8_0 = gguf.quants.quantize(q_src, QT.Q8_0)

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tensor("f32", f32)
    w.add_tensor("f16", f16)
    w.add_tensor("q4_0", q4_0, raw_dtype=QT.Q4_0)
    w.add_tensor("q8_0", q8_0, raw_dtype=QT.Q8_0)
    w.add_tensor("q6_k", k_src, raw_dtype=QT.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    r = gguf.GGUFReader(str(path))
    t = {x.name: x for x in r.tensors}
    # the reader reports ggml order: ne[0] (innermost, contiguous) first
    assert [int(s) for s in t["f32"].shape] == [64, 3]
    assert [int(s) for s in t["q4_0"].shape] == [256, 7]
    assert [int(s) for s in t["q6_k"].shape] == [256, 3, 2]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. no "non-writable array" warning from the read-only memmap
        out = {name: dequantize_tensor(x) for name, x in t.items()}

    assert out["f32"].shape == (3, 64)
    assert torch.equal(out["f32"], torch.from_numpy(f32))
    assert torch.equal(out["f16"], torch.from_numpy(f16.astype(np.float32)))
    assert out["q4_0"].shape == (7, 256)
    assert_bitwise_equal(out["q4_0"], gguf.quants.dequantize(q4_0, QT.Q4_0))
    assert_bitwise_equal(out["q8_0"], gguf.quants.dequantize(q8_0, QT.Q8_0))
    assert (out["q8_0"] - torch.from_numpy(q_src)).abs().max() < 0.05  # really is the same matrix
    assert_bitwise_equal(out["q6_k"], gguf.quants.dequantize(k_src, QT.Q6_K))
    assert out["q6_k"].shape == (2, 3, 256)


@pytest.mark.parametrize("qtype", [QT.IQ2_XXS, QT.TQ1_0, QT.F64, QT.I8], ids=lambda t: t.name)
def test_unsupported_type_raises(qtype):
    raw = np.zeros(1024, dtype=np.uint8)
    with pytest.raises(UnsupportedTensorType) as ei:
        dequantize(raw, qtype, (1, 256), name="blk.0.attn_q.weight")
    msg = str(ei.value)
    assert qtype.name in msg
    assert "blk.0.attn_q.weight" in msg
    assert "Q4_K" in msg and "Q8_0" in msg  # lists supported types
    assert isinstance(ei.value, ValueError)


def test_unknown_type_id_raises():
    with pytest.raises(UnsupportedTensorType):
        dequantize(np.zeros(64, dtype=np.uint8), 9999, (32,), name="x")


def test_bad_sizes_raise():
    raw = quantized(QT.Q4_0, 2, 64, seed=0)
    with pytest.raises(ValueError, match="bytes"):
        dequantize(raw, QT.Q4_0, (3, 64))
    with pytest.raises(ValueError, match="block size"):
        dequantize(raw, QT.Q4_0, (4, 48))


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1], ids=lambda t: t.name)
def test_q4_blocks(qtype, rows):
    cols = 96
    raw = quantized(qtype, rows, cols, seed=rows)
    scales, mins, nib = q4_blocks(raw, qtype, (rows, cols))
    assert scales.dtype == torch.float16 and scales.shape == (rows, cols // 32)
    assert nib.dtype == torch.uint8 and nib.shape == (rows, cols // 2)
    blocks = raw.reshape(rows, cols // 32, -1)
    assert np.array_equal(scales.numpy(), blocks[:, :, 0:2].copy().view(np.float16)[..., 0])
    if qtype == QT.Q4_0:
        assert mins is None
    else:
        assert mins.dtype == torch.float16 and mins.shape == (rows, cols // 32)
        assert np.array_equal(mins.numpy(), blocks[:, :, 2:4].copy().view(np.float16)[..., 0])
    # element order, low nibble first
    q = torch.stack([nib & 15, nib >> 4], dim=-1).reshape(rows, cols // 32, 32).float()
    d = scales.float().unsqueeze(-1)
    w = (q - 8) * d if mins is None else q * d + mins.float().unsqueeze(-1)
    assert_bitwise_equal(w.reshape(rows, cols), gguf.quants.dequantize(raw, qtype))


def test_q4_blocks_element_order_hand_built():
    d = np.array([1.0], dtype=np.float16).view(np.uint8)
    qs = np.array([i | ((15 - i) << 4) for i in range(16)], dtype=np.uint8)  # q = 0..15, 15..0
    _, mins, nib = q4_blocks(np.concatenate([d, qs]), QT.Q4_0, (32,))
    assert mins is None
    q = list(range(16)) + [15 - i for i in range(16)]
    assert nib.flatten().tolist() == [q[2 * k] | (q[2 * k + 1] << 4) for k in range(16)]


def test_q4_blocks_rejects_other_types():
    with pytest.raises(ValueError):
        q4_blocks(np.zeros(34, dtype=np.uint8), QT.Q8_0, (32,))
