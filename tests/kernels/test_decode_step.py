"""The one-call int4 decode step (csrc/decode.cpp) against the op-by-op forward of the same model."""

from __future__ import annotations

import pytest
import torch

from llmopt.config import EngineConfig
from llmopt.engine import fused_decode
from llmopt.engine.engine import LLMEngine
from llmopt.engine.fused_decode import FusedDecoder
from llmopt.engine.sampling_params import SamplingParams
from llmopt.kernels import decode_step
from llmopt.models.transformer import AttnContext
from tests.conftest import chained_vs_single, decode_batch, fused_and_forward, save_hf_dir, tiny_hf_model

pytestmark = pytest.mark.skipif(decode_step._native() is None, reason="native kernels unavailable")

BS = 16


def _engine(tmp_path, arch="llama", threads=1, quant="int4", group_size=64, layers=2, **overrides):
    m = tiny_hf_model(arch, hidden_size=128, intermediate_size=192, num_hidden_layers=layers, **overrides)
    d = save_hf_dir(m, tmp_path / f"{arch}-{layers}")
    cfg = EngineConfig(num_threads=threads, num_kv_blocks=96, block_size=BS)
    return LLMEngine(str(d), cfg, quant=quant, group_size=group_size)


def _both(eng, lens, tiles, seed=0):
    """(fused hidden, fused caches, op-by-op hidden, op-by-op caches) from the same random cache;
    ``tiles`` for both paths (the op-by-op int4 linears take them from 4 rows with K <= 1024)."""
    from llmopt.kernels import qlinear

    qlinear_tiles, qlinear.TILES = qlinear.TILES, tiles
    try:
        return fused_and_forward(eng, lens, BS, seed, tiles)
    finally:
        qlinear.TILES = qlinear_tiles


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("threads", [1, 2])
def test_generic_columns_bit_identical(tmp_path, arch, threads):
    """Without the 4-column tiles the step runs the standalone kernels in the same order: exact."""
    eng = _engine(tmp_path, arch, threads=threads)
    a, ca, b, cb = _both(eng, [7, 33, 1, 50, 16], tiles=False)
    assert a.shape == (5, 128)
    assert torch.equal(a, b)
    assert torch.equal(ca[0], cb[0]) and torch.equal(ca[1], cb[1])  # new k/v written to the same slots


@pytest.mark.parametrize("rows", [1, 3, 4, 9, 17])
@pytest.mark.parametrize("gs", [64, 128, 256])
def test_tile_kernel_vs_reference(rows, gs):
    """The 4-column GEMV tiles against the plain-torch int4 x int8-activation reference."""
    from llmopt.formats.layouts import quantize
    from llmopt.kernels.qlinear import interleaved_scales, reference_linear

    g = torch.Generator().manual_seed(rows * gs)
    n, k = 52, 2 * 256 + gs  # N % 4 == 0, K a multiple of the group and not of 256
    qw = quantize(torch.randn(n, k, generator=g), "int4", gs)
    x = torch.randn(rows, k, generator=g)
    bias = torch.randn(n, generator=g)
    ref = reference_linear(x, qw, bias, act="int8")
    sc4, mn4 = interleaved_scales(qw)
    assert sc4 is not None
    for tiles in (True, False):
        y = decode_step._native().linear_a8(x, qw["qweight"], qw["scales"], qw["mins"], gs, bias,
                                            sc4 if tiles else None, mn4 if tiles else None)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


def test_tile_copies_checked():
    from llmopt.formats.layouts import quantize
    from llmopt.kernels.qlinear import interleaved_scales

    qw = quantize(torch.randn(8, 128), "int4", 64)
    sc4, mn4 = interleaved_scales(qw)
    x = torch.randn(4, 128)
    lin = decode_step._native().linear_a8
    with pytest.raises(RuntimeError, match="come together"):
        lin(x, qw["qweight"], qw["scales"], qw["mins"], 64, None, sc4, None)
    with pytest.raises(RuntimeError, match="contiguous float16"):
        lin(x, qw["qweight"], qw["scales"], qw["mins"], 64, None, sc4.float(), mn4)
    q6 = quantize(torch.randn(6, 128), "int4", 64)
    assert interleaved_scales(q6) == (None, None)  # N % 4 != 0: no tiles
    with pytest.raises(RuntimeError, match="out_features % 4"):
        lin(x, q6["qweight"], q6["scales"], q6["mins"], 64, None, q6["scales"], q6["mins"])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiles_stack_bit_identical(tmp_path, arch):
    """From 4 rows on both paths run the 4-column tiles (the op-by-op linears do for K <= 1024, as
    all of this model's): exact too."""
    from llmopt.kernels import qlinear

    eng = _engine(tmp_path, arch)
    lins = [m for layer in eng.model.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                         layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    copies = [qlinear._tile_params_cache[id(lin.scales)][4] for lin in lins]  # made by the engine's step
    a, ca, b, cb = _both(eng, [5 + 7 * i for i in range(6)], tiles=True)
    assert torch.equal(a, b)
    assert torch.equal(ca[0], cb[0]) and torch.equal(ca[1], cb[1])
    # the op-by-op path used the step's interleaved copies: one per linear, not a second set
    assert all(qlinear.interleaved_scales(lin.qweight_packed)[0] is c for lin, c in zip(lins, copies))


def test_tiles_against_column_kernels_close(tmp_path):
    """Tiles on one side only: the sums run in another order and the next int8 re-quantization of
    slightly different activations may round a value the other way: close, not equal."""
    from llmopt.kernels import qlinear

    eng = _engine(tmp_path, "llama")
    lens = [5 + 7 * i for i in range(6)]
    before = qlinear.TILES
    a = _both(eng, lens, tiles=True)[0]
    b = _both(eng, lens, tiles=False)[2]
    assert qlinear.TILES == before  # restored
    assert ((a - b).norm() / b.norm()) < 2e-2
    assert (a - b).abs().max() < 0.1 * b.abs().max()


def test_split_attention_and_window(tmp_path):
    """One kv head and a long context: the attention is split over tokens across 2 threads (the
    standalone kernel's rule) and merged; a sliding window on the first layer limits its span."""
    eng = _engine(tmp_path, "qwen2", threads=2, num_key_value_heads=1, use_sliding_window=True,
                  sliding_window=100, max_window_layers=1)
    assert eng.model.layers[0].self_attn.window in (None, 100) and len({l.self_attn.window for l in eng.model.layers}) == 2
    a, _, b, _ = _both(eng, [700], tiles=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch, threads", [("llama", 1), ("qwen2", 2), ("qwen3", 2)])
def test_chained_rows_equal_forward(tmp_path, arch, threads):
    """Short prefill chunks as chained rows of the int4 step (each row over its context up to itself,
    new K/V written before any attention reads): the op-by-op forward's bits. One row at a time is
    close, not equal: the int4 GEMV's sums depend on the row count (4-column tiles from 4 rows)."""
    eng = _engine(tmp_path, arch, threads=threads)
    for seed, (lens, chunks) in enumerate([([20], [(9, 5), (30, 3)]), ([], [(0, 7)]), ([3, 40], [(15, 2)])]):
        (a, ca), (b, cb), (c, _) = chained_vs_single(eng, BS, lens, chunks, seed)
        assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ca, cb)), f"case {seed}"
        assert ((a - c).norm() / c.norm()) < 2e-2


def test_engine_greedy_same_tokens(tmp_path, monkeypatch):
    """Greedy generation with the fused step equals the op-by-op engine, alone and batched."""
    eng = _engine(tmp_path, "llama", threads=2)
    assert eng.runner.fused is not None
    prompts = [[3, 17, 42, 9, 100], [5, 6, 7], [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    fused = [o.token_ids for o in eng.generate(prompts, sp)]
    eng.runner.fused = None
    plain = [o.token_ids for o in eng.generate(prompts, sp)]
    assert fused == plain


def test_not_used_when_model_does_not_qualify(tmp_path, monkeypatch):
    assert _engine(tmp_path, quant="int8").runner.fused is None  # another format
    assert _engine(tmp_path, quant="int4", group_size=32).runner.fused is None  # int8 activations need g % 64 == 0
    model = _engine(tmp_path / "b").model  # MLP biases (no loaded model has them): the step has no place for them
    assert fused_decode._why_not(model) is None
    model.layers[1].mlp.down_proj.bias = torch.zeros(model.cfg.hidden_size)
    assert fused_decode._why_not(model) == "layer 1 has MLP biases"
    assert FusedDecoder.build(model) is None
    monkeypatch.setenv("LLMOPT_FUSED_DECODE", "0")
    assert _engine(tmp_path).runner.fused is None


def test_steps_it_does_not_take(tmp_path, monkeypatch):
    """Rows over the int8-activation limit, or exact int4 activations, go op by op (run -> None)."""
    eng = _engine(tmp_path)
    fused = eng.runner.fused
    ids, pos, ctx = decode_batch([4, 5], BS)
    monkeypatch.setattr("llmopt.kernels.qlinear.INT4_ACT", "fp32")
    assert fused.run(ids, pos, ctx) is None
    monkeypatch.setattr("llmopt.kernels.qlinear.INT4_ACT", "int8")
    monkeypatch.setattr("llmopt.kernels.qlinear.INT4_A8_MAX_M", 1)
    assert fused.run(ids, pos, ctx) is None


def test_bad_inputs_raise(tmp_path):
    eng = _engine(tmp_path)
    fused = eng.runner.fused
    ids, pos, ctx = decode_batch([4, 20], BS)
    with torch.inference_mode():
        bad = AttnContext(ctx.slot_mapping, 2, ctx.decode_block_tables.clone(), ctx.decode_context_lens)
        bad.decode_block_tables[1, 1] = 10_000
        with pytest.raises(RuntimeError, match="block_tables"):
            fused.run(ids, pos, bad)
        with pytest.raises(RuntimeError, match="position"):
            fused.run(ids, torch.tensor([4, 10**7]), ctx)
        bad = AttnContext(torch.tensor([0, 10**9]), 2, ctx.decode_block_tables, ctx.decode_context_lens)
        with pytest.raises(RuntimeError, match="slot"):
            fused.run(ids, pos, bad)
        bad = AttnContext(ctx.slot_mapping, 2, ctx.decode_block_tables, torch.tensor([0, 20], dtype=torch.int32))
        with pytest.raises(RuntimeError, match="context_lens"):
            fused.run(ids, pos, bad)


@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_int8_head_kernel_vs_reference(rows, gs):
    """The decode-time head: int8 grouped weights x per-group int8 activations (4-column tiles)
    against plain torch (activations quantized and dequantized per group, then F.linear)."""
    from llmopt.formats.layouts import dequantize, quantize
    from llmopt.formats.rtn import quantize_activations_int8_grouped

    g = torch.Generator().manual_seed(rows + gs)
    n, k = 44, 4 * gs
    qw = quantize(torch.randn(n, k, generator=g), "int8", gs)
    x = torch.randn(rows, k, generator=g) * 3
    bias = torch.randn(n, generator=g)
    xq, sx = quantize_activations_int8_grouped(x, gs)
    xhat = (xq.float().reshape(rows, k // gs, gs) * sx.unsqueeze(-1)).reshape(rows, k)
    ref = torch.nn.functional.linear(xhat.double(), dequantize(qw).double(), bias.double()).float()
    head = decode_step._native().I8Linear(qw["qweight"], qw["scales"], k, gs, bias)
    torch.testing.assert_close(head(x), ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="x must be"):
        head(torch.randn(rows, k + 1))


def test_engine_uses_int8_head_at_decode(tmp_path):
    eng = _engine(tmp_path, "llama")
    fused = eng.runner.fused
    assert fused.head is not None  # llama here is untied: its own int8 lm_head
    h = torch.randn(3, 128)
    ref = eng.model.compute_logits(h)
    got = fused.logits(h)
    assert got.shape == ref.shape
    assert ((got - ref).norm() / ref.norm()) < 1e-2  # int8 activation rounding only
