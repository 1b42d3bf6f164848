"""The one-call decode step (csrc/decode.cpp) on GGUF blocks against the op-by-op forward of the same
model: same kernels (the GGUF build's kernel table), same order, so the same bits and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llmopt.config import EngineConfig, KernelSettings
from llmopt.engine import fused_decode
from llmopt.engine.engine import LLMEngine
from llmopt.engine.fused_decode import FusedDecoder
from llmopt.engine.sampling_params import SamplingParams
from llmopt.kernels import decode_step
from llmopt.kernels import gguf_linear as G
from llmopt.kernels.dense import PackedLinear
from llmopt.models.gguf_linear import GGUFLinear
from tests.conftest import avx2_greedy_fused_on_and_off, fused_and_forward, gguf_blocks, tiny_hf_model, write_gguf

pytestmark = pytest.mark.skipif(decode_step._native() is None or G.kernel_table() is None,
                                reason="native kernels unavailable")

QT = gguf.GGMLQuantizationType
BS = 16
# every type with a native kernel; gguf.quants quantizes the legacy ones, the K-quants get random
# valid blocks (small fp16 super-block scales)
LEGACY = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0]
K_TYPES = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]


@pytest.fixture(scope="module")
def tiny():
    """arch -> transformers model; every in_features a multiple of 256 so K-quants fit (qwen2 with a
    qkv bias, qwen3 with q/k norms; 4 query heads on 1 kv head)."""
    return {arch: tiny_hf_model(arch, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                num_key_value_heads=1, head_dim=64, num_hidden_layers=2)
            for arch in ("llama", "qwen2", "qwen3")}


def _file(tiny, tmp_path: Path, qtype, arch: str = "llama") -> Path:
    name = qtype.name if isinstance(qtype, QT) else "mixed"
    return write_gguf(tiny[arch], tmp_path / f"{arch}-{name}.gguf", qtype=qtype, quantizer=gguf_blocks)


def _engine(path: Path, threads: int = 1, act: str = "fp32", fused: bool = True) -> LLMEngine:
    cfg = EngineConfig(num_threads=threads, num_kv_blocks=96, block_size=BS,
                       kernels=KernelSettings(gguf_act=act, fused_decode=fused))
    return LLMEngine(str(path), cfg)


def _assert_step_equals_forward(eng: LLMEngine, lens: list[int], seed: int = 0) -> None:
    """Fused step vs ``model.forward`` from the same random cache: hidden states and the new k/v
    written to the cache, bit for bit."""
    a, ca, b, cb = fused_and_forward(eng, lens, BS, seed)
    assert a is not None and a.shape == b.shape
    assert torch.equal(a, b), f"rows {len(lens)}: max |diff| {(a - b).abs().max().item():.3g}"
    assert torch.equal(ca[0], cb[0]) and torch.equal(ca[1], cb[1])


# rows: 1 (decode), 3 and 4 (register tiles of 3 / 4 rows), 6 (more than gguf_linear.SMALL_M: the
# op-by-op linears take the dequantized-panel path, the step's kernels too); one row with a long
# context (2 threads, 1 kv head: attention split over tokens, merged after)
LENS = {1: [40], 3: [7, 33, 1], 4: [5, 20, 17, 64], 6: [3, 9, 50, 16, 2, 70], 7: [700]}


@pytest.mark.parametrize("qt", LEGACY + K_TYPES, ids=lambda t: t.name)
def test_step_bit_identical_to_forward_every_type(tiny, tmp_path, qt):
    eng = _engine(_file(tiny, tmp_path, qt), threads=2)
    assert isinstance(eng.model.layers[0].mlp.down_proj, GGUFLinear)
    assert eng.runner.fused is not None
    for rows, lens in LENS.items():
        _assert_step_equals_forward(eng, lens, seed=rows)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("threads", [1, 2])
def test_step_bit_identical_per_arch_and_thread_count(tiny, tmp_path, arch, threads):
    """qwen2: qkv bias (added in the kernel); qwen3: q/k norms; Q4_1 layers, Q8_0 tied head (the
    default model's types)."""
    def qtype(name: str):
        return QT.Q8_0 if name == "token_embd.weight" else QT.Q4_1

    eng = _engine(_file(tiny, tmp_path, qtype, arch), threads=threads)
    assert eng.runner.fused is not None
    for rows, lens in LENS.items():
        _assert_step_equals_forward(eng, lens, seed=rows)


def test_mixed_types_and_int8_activations(tiny, tmp_path):
    """A Q4_K_M-like file (qkv = Q4_K rows + Q6_K attn_v rows, Q6_K ffn_down, a Q3_K ffn_gate) in the
    int8 mode: the Q4_K / Q6_K parts take int8 activations, the Q3_K one (no int8 kernel) stays
    fp32, each as the op-by-op forward does."""
    def qtype(name: str):
        if name.endswith(("attn_v.weight", "ffn_down.weight")):
            return QT.Q6_K
        if name.endswith("ffn_gate.weight"):
            return QT.Q3_K
        return QT.Q8_0 if name.endswith("ffn_up.weight") else QT.Q4_K

    path = write_gguf(tiny["qwen2"], tmp_path / "q4km.gguf", qtype=qtype, quantizer=gguf_blocks)
    for act in ("fp32", "int8"):
        eng = _engine(path, threads=2, act=act)
        qkv = eng.model.layers[0].self_attn.qkv_proj
        assert qkv.type_names == ["Q4_K", "Q6_K"] and qkv.acts == [act, act]
        gate_up = eng.model.layers[0].mlp.gate_up_proj
        assert gate_up.type_names == ["Q3_K", "Q8_0"] and gate_up.acts == ["fp32", act]
        assert eng.model.layers[0].mlp.down_proj.acts == [act]
        assert eng.runner.fused is not None
        for rows, lens in LENS.items():
            _assert_step_equals_forward(eng, lens, seed=rows)


@pytest.mark.parametrize("qt", [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K],
                         ids=lambda t: t.name)
def test_int8_activation_mode_bit_identical(tiny, tmp_path, qt):
    eng = _engine(_file(tiny, tmp_path, qt), threads=2, act="int8")
    assert eng.model.layers[1].mlp.gate_up_proj.acts == ["int8"]
    for rows, lens in LENS.items():
        _assert_step_equals_forward(eng, lens, seed=rows)


def test_avx2_path_bit_identical(tiny, tmp_path, monkeypatch):
    """The AVX2 build (what LLMOPT_CPU_PATH=avx2 chooses; every machine's floor) in both paths."""
    if "avx2" not in G.available_paths():
        pytest.skip("no AVX2 build")
    monkeypatch.setattr(G, "_chosen", "avx2")
    for act, qt in (("fp32", QT.Q4_1), ("int8", QT.Q4_1), ("fp32", QT.Q6_K), ("int8", QT.Q8_0), ("int8", QT.Q5_0),
                    ("int8", QT.Q6_K)):
        eng = _engine(_file(tiny, tmp_path, qt), threads=2, act=act)
        assert G.kernel_table().path == "avx2"
        for rows, lens in LENS.items():
            _assert_step_equals_forward(eng, lens, seed=rows)


@pytest.mark.parametrize("act", ["fp32", "int8", "by-kind"])
def test_greedy_tokens_fused_on_and_off(tiny, tmp_path, act):
    """Greedy generation with the fused step (KernelSettings.fused_decode) equals the op-by-op
    engine, alone and batched."""
    path = _file(tiny, tmp_path, QT.Q4_1)
    prompts = [[3, 17, 42, 9, 100], [5, 6, 7], [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [42]]
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    on = _engine(path, threads=2, act=act)
    assert on.runner.fused is not None
    batched = [o.token_ids for o in on.generate(prompts, sp)]
    single = [on.generate([p], sp)[0].token_ids for p in prompts]
    off = _engine(path, threads=2, act=act, fused=False)
    assert off.runner.fused is None
    plain = [o.token_ids for o in off.generate(prompts, sp)]
    assert batched == single == plain


def test_avx2_env_greedy_tokens_fused_on_and_off(tiny, tmp_path):
    """LLMOPT_CPU_PATH=avx2 and LLMOPT_FUSED_DECODE=0 / 1 in fresh processes: the same tokens."""
    path = _file(tiny, tmp_path, QT.Q4_K)
    got = avx2_greedy_fused_on_and_off(path)
    assert got["1"].split(" ", 3)[3] == got["0"].split(" ", 3)[3]


def test_gguf_kernels_are_set_when_the_first_projection_is_packed(tiny, tmp_path):
    """Layer 0's qkv in F16 (packed fp32) before every GGUF projection: the step still gets the GGUF
    kernel table (set at the first GGUF projection, wherever it is) and fuses the whole stack."""
    def qtype(name: str):
        return QT.F16 if name.startswith("blk.0.attn_") and name[11:] in ("q.weight", "k.weight", "v.weight") \
            else QT.Q4_1

    eng = _engine(write_gguf(tiny["llama"], tmp_path / "f16-first.gguf", qtype=qtype), threads=2)
    assert isinstance(eng.model.layers[0].self_attn.qkv_proj, PackedLinear)
    assert isinstance(eng.model.layers[0].self_attn.o_proj, GGUFLinear)
    assert eng.runner.fused is not None
    for rows, lens in LENS.items():
        _assert_step_equals_forward(eng, lens, seed=rows)


def test_falls_back_with_a_reason(tiny, tmp_path, monkeypatch, caplog):
    """A projection the step does not take (F16 as torch's own Linear) or GGUF kernels on the torch
    reference path: op by op, and ``_why_not`` says which and why. The same F16 projection packed
    (the default) is one the step takes, next to the GGUF ones: the same bits as the forward."""
    def qtype(name: str):
        return QT.F16 if name == "blk.1.attn_output.weight" else QT.Q4_1

    path = write_gguf(tiny["llama"], tmp_path / "f16.gguf", qtype=qtype)
    mixed = _engine(path, threads=2)
    assert isinstance(mixed.model.layers[1].self_attn.o_proj, PackedLinear) and mixed.runner.fused is not None
    for rows, lens in LENS.items():
        _assert_step_equals_forward(mixed, lens, seed=rows)
    eng = LLMEngine(str(path), EngineConfig(num_threads=1, num_kv_blocks=96, block_size=BS, packed_linear=False))
    assert eng.runner.fused is None
    why = fused_decode._why_not(eng.model)
    assert why is not None and why.startswith("layer 1 o_proj is a ") and "GGUFLinear" in why
    ok = _engine(_file(tiny, tmp_path, QT.Q4_0))
    assert fused_decode._why_not(ok.model) is None
    monkeypatch.setattr(G, "_chosen", "reference")
    assert "torch reference path" in fused_decode._why_not(ok.model)
    with caplog.at_level("INFO", logger="llmopt.engine.fused_decode"):
        assert FusedDecoder.build(ok.model) is None
    assert "torch reference path" in caplog.text


def test_step_checks_its_gguf_inputs(tiny, tmp_path):
    """Bad parts are refused at set-up with a message naming the projection, not read out of bounds."""
    eng = _engine(_file(tiny, tmp_path, QT.Q4_1))
    step = eng.runner.fused.step
    lin = eng.model.layers[0].mlp.down_proj
    p = lin.parts[0]
    none = torch.empty(0)
    with pytest.raises(RuntimeError, match="down_proj: part 0 must be the contiguous uint8 packed layout"):
        step.set_gguf(0, 3, [p.data[:-1]], [p.ggml_type], [p.out_features], [False], none)
    with pytest.raises(RuntimeError, match="down_proj: parts have 128 rows, the projection 256"):
        step.set_gguf(0, 3, [p.data[:8]], [p.ggml_type], [128], [False], none)
    with pytest.raises(RuntimeError, match="no GGUF kernel for ggml type id 1"):
        step.set_gguf(0, 3, [p.data], [1], [p.out_features], [False], none)  # F16
    with pytest.raises(RuntimeError, match="no int8-activation kernel"):
        q3 = G.pack_gguf(np.zeros((256, 2 * gguf.GGML_QUANT_SIZES[QT.Q3_K][1]), np.uint8), QT.Q3_K, (256, 512))
        step.set_gguf(0, 3, [q3.data], [q3.ggml_type], [256], [True], none)
    with pytest.raises(RuntimeError, match="KernelTable capsule"):
        step.set_gguf_kernels(object(), 4)
