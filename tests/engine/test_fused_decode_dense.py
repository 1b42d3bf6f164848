"""The one-call decode step (csrc/decode.cpp) on packed fp32 projections (PackedLinear, what an fp32
model and GRPO's rollout weights run) against the op-by-op forward of the same model: the same
packed GEMM (the sgemm build's kernel table), the same order, so the same bits and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmopt.config import EngineConfig, KernelSettings
from llmopt.engine import fused_decode
from llmopt.engine.engine import LLMEngine
from llmopt.engine.sampling_params import SamplingParams
from llmopt.kernels import decode_step
from llmopt.kernels import dense as D
from llmopt.kernels.dense import PackedLinear
from tests.conftest import avx2_greedy_fused_on_and_off, fused_and_forward, save_hf_dir, tiny_hf_model

pytestmark = pytest.mark.skipif(decode_step._native() is None or D.kernel_table() is None,
                                reason="native kernels unavailable")

BS = 16
# rows: 1 (decode), 3 and 5 (register tiles of 3 / 5 rows), 7 and 13 (more than one 6-row tile per
# panel); one row with a long context (2 threads, 1 kv head: attention split over tokens, merged after)
LENS = {1: [40], 3: [7, 33, 1], 5: [5, 20, 17, 64, 2], 7: [3, 9, 50, 16, 2, 70, 31], 13: list(range(3, 42, 3)),
        14: [700]}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """arch -> HF dir: qwen2 with a qkv bias, qwen3 with q/k norms; 4 query heads on 1 kv head;
    N of every projection not a multiple of 16 somewhere (the last panel's masked columns)."""
    root = tmp_path_factory.mktemp("dense")
    out = {}
    for arch in ("llama", "qwen2", "qwen3"):
        m = tiny_hf_model(arch, hidden_size=72, intermediate_size=100, num_attention_heads=4, num_key_value_heads=1,
                          head_dim=18, num_hidden_layers=2)
        out[arch] = save_hf_dir(m, root / arch)
    return out


def _engine(path: Path, threads: int = 1, fused: bool = True, packed: bool = True) -> LLMEngine:
    cfg = EngineConfig(num_threads=threads, num_kv_blocks=96, block_size=BS, packed_linear=packed,
                       kernels=KernelSettings(fused_decode=fused))
    return LLMEngine(str(path), cfg)


def _assert_step_equals_forward(eng: LLMEngine, lens: list[int], seed: int = 0) -> None:
    a, ca, b, cb = fused_and_forward(eng, lens, BS, seed)
    assert a is not None and a.shape == b.shape
    assert torch.equal(a, b), f"rows {len(lens)}: max |diff| {(a - b).abs().max().item():.3g}"
    assert torch.equal(ca[0], cb[0]) and torch.equal(ca[1], cb[1])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("threads", [1, 2])
def test_step_bit_identical_per_arch_and_thread_count(hf_dirs, arch, threads):
    """llama: no biases; qwen2: the qkv bias added in the packed kernel; qwen3: q/k norms."""
    eng = _engine(hf_dirs[arch], threads=threads)
    qkv = eng.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, PackedLinear) and isinstance(eng.model.layers[1].mlp.down_proj, PackedLinear)
    assert (qkv.bias is not None) == (arch == "qwen2")
    assert eng.runner.fused is not None
    for rows, lens in LENS.items():
        _assert_step_equals_forward(eng, lens, seed=rows)


def test_greedy_tokens_fused_on_and_off(hf_dirs):
    """Greedy generation with the fused step equals the op-by-op engine, alone and batched."""
    prompts = [[3, 17, 42, 9, 100], [5, 6, 7], [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [42]]
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    on = _engine(hf_dirs["qwen2"], threads=2)
    assert on.runner.fused is not None
    batched = [o.token_ids for o in on.generate(prompts, sp)]
    single = [on.generate([p], sp)[0].token_ids for p in prompts]
    off = _engine(hf_dirs["qwen2"], threads=2, fused=False)
    assert off.runner.fused is None
    plain = [o.token_ids for o in off.generate(prompts, sp)]
    assert batched == single == plain


def test_avx2_env_greedy_tokens_fused_on_and_off(hf_dirs):
    """LLMOPT_CPU_PATH=avx2 (every machine's floor) and LLMOPT_FUSED_DECODE=0 / 1 in fresh processes:
    the fp32 model decodes the same tokens with and without the step (qwen2: qkv bias)."""
    got = avx2_greedy_fused_on_and_off(hf_dirs["qwen2"])
    assert got["1"].split(" ", 3)[3] == got["0"].split(" ", 3)[3]


def test_unpacked_float_model_falls_back_with_a_reason(hf_dirs):
    """torch's own nn.Linear (packed_linear off) is not a projection the step takes: op by op."""
    eng = _engine(hf_dirs["llama"], packed=False)
    assert eng.runner.fused is None
    assert fused_decode._why_not(eng.model) == ("layer 0 qkv_proj is a Linear (the step takes int4 QuantLinear, "
                                                "GGUFLinear or PackedLinear)")


def test_step_checks_its_dense_inputs(hf_dirs):
    """A packed weight of the wrong shape or type is refused at set-up with a message naming the
    projection, not read out of bounds."""
    eng = _engine(hf_dirs["qwen2"])
    step = eng.runner.fused.step
    lin = eng.model.layers[0].mlp.down_proj
    none = torch.empty(0)
    with pytest.raises(RuntimeError, match=r"down_proj: the packed weight must be a contiguous float32 \[5, 100, 16\]"):
        step.set_dense(0, 3, lin.packed[:, :50].contiguous(), none)
    with pytest.raises(RuntimeError, match="down_proj: the packed weight"):
        step.set_dense(0, 3, lin.packed.double(), none)
    with pytest.raises(RuntimeError, match="bias must be a contiguous CPU float32 tensor of 72"):
        step.set_dense(0, 3, lin.packed, torch.zeros(71))
    with pytest.raises(RuntimeError, match="KernelTable capsule"):
        step.set_dense_kernels(object())


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_step_with_rows_walked_whole(tmp_path, threads):
    """3 kv heads and row counts the threads divide: the step's attention takes one item per row over all
    its kv heads (fused_kernels.h walk_rows_whole / attend_range_heads); the step still equals the
    op-by-op forward bit for bit (per-row equality of the two walks: tests/kernels/test_attention_isa.py)."""
    m = tiny_hf_model("qwen2", hidden_size=96, intermediate_size=100, num_attention_heads=6, num_key_value_heads=3,
                      head_dim=16, num_hidden_layers=2)
    eng = _engine(save_hf_dir(m, tmp_path / "m"), threads=threads)
    # at 4 threads the 3 kv heads are fewer than the threads, so rows past 256 tokens split their tokens
    # into chunks by their own context (per-item partials of G heads, though each thread's scratch holds
    # every head), beside rows that do not split: the same chunks as the op-by-op forward's
    for lens in ([5, 70], [5, 20, 17, 64], [3, 9, 50, 16, 2, 70, 31, 97], [700], [300, 5, 257, 40]):
        _assert_step_equals_forward(eng, lens, seed=len(lens))
