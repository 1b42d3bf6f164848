"""The one-call decode step (csrc/decode.cpp) with Quest sparse attention (kv_policy "quest") against
the op-by-op forward: the step folds each new key row into its block's summary and reads the blocks
csrc/quest.h chooses with the standalone kernel's walk, float32 and int8 caches, so the same hidden
states, cache bytes and summaries bit for bit, and the same greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmopt.config import EngineConfig, KernelSettings
from llmopt.engine.engine import LLMEngine
from llmopt.engine.sampling_params import SamplingParams
from llmopt.kernels import decode_step, kv_quant, quest
from llmopt.kernels import dense as D
from llmopt.kernels import gguf_linear as G
from tests.conftest import avx2_greedy_fused_on_and_off, decode_batch, save_hf_dir, tiny_hf_model

pytestmark = pytest.mark.skipif(decode_step._native() is None or D.kernel_table() is None
                                or not kv_quant.native_available() or not quest.native_available(),
                                reason="native kernels unavailable")

BS = 16
# rows 1-8, contexts from one token to many blocks; topk per row cycles through TOPK (0: every block)
LENS = {1: [300], 2: [1, 700], 3: [7, 330, 129], 4: [5, 200, 17, 640], 8: [3, 90, 500, 16, 2, 170, 310, 97]}
TOPK = [3, 0, 2, 5, 1]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """llama and qwen3 (q/k norms before the write), 4 query heads on 2 kv heads, head_dim 18 (tails)."""
    root = tmp_path_factory.mktemp("quest")
    return {arch: save_hf_dir(tiny_hf_model(arch, hidden_size=72, intermediate_size=100, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=18, num_hidden_layers=2), root / arch)
            for arch in ("llama", "qwen3")}


def _engine(path: Path, threads: int = 1, fused: bool = True, kv_dtype: str = "float32", **kw) -> LLMEngine:
    cfg = EngineConfig(num_threads=threads, num_kv_blocks=400, block_size=BS, kv_dtype=kv_dtype,
                       kernels=KernelSettings(fused_decode=fused), **kw)
    return LLMEngine(str(path), cfg)


def _random_fp8_codes(shape, g: torch.Generator) -> torch.Tensor:
    """Every finite e4m3fn code (not 0x7f / 0xff, the NaNs), uniformly."""
    c = torch.randint(0, 0x7F, shape, generator=g, dtype=torch.uint8)
    return (c | (torch.randint(0, 2, shape, generator=g, dtype=torch.uint8) << 7)).view(kv_quant.FP8)


def _step_and_forward(eng: LLMEngine, lens: list[int], seed: int, dense: bool = False):
    """Fused step and op-by-op forward from the same random cache and its true block summaries."""
    r = eng.runner
    g = torch.Generator().manual_seed(seed)
    init = [torch.randint(-127, 128, t.shape, generator=g, dtype=torch.int8) if t.dtype == torch.int8
            else _random_fp8_codes(t.shape, g) if t.dtype == kv_quant.FP8
            else torch.rand(t.shape, generator=g) * 0.05 if i >= 2 else torch.randn(t.shape, generator=g)
            for i, t in enumerate(r.cache_tensors)]
    k = init[0].float() if r.k_scale is None else kv_quant.dequantize_kv(init[0], init[2])
    summaries = [k.amin(2), k.amax(2)]
    ids, pos, ctx = decode_batch(lens, BS, seed)
    ctx.decode_topk = torch.tensor([0 if dense else TOPK[i % len(TOPK)] for i in range(len(lens))], dtype=torch.int32)
    ctx.quest_dense_layers = eng.config.kv_quest_dense_layers
    fused = r.fused
    assert fused is not None
    out = []
    with torch.inference_mode():
        for run in (lambda: fused.run(ids, pos, ctx), lambda: r.model(ids, pos, ctx)):
            for t, t0 in zip(r.cache_tensors + [r.k_min, r.k_max], init + summaries):
                t.copy_(t0)
            h = run()
            out.append((h, [t.clone() for t in r.cache_tensors + [r.k_min, r.k_max]]))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("kv_dtype", ["float32", "int8", "fp8"])
@pytest.mark.parametrize("threads", [1, 2])
def test_quest_step_bit_identical_to_the_op_by_op_forward(hf_dirs, arch, kv_dtype, threads):
    eng = _engine(hf_dirs[arch], threads=threads, kv_dtype=kv_dtype, kv_policy="quest", kv_budget=0.25,
                  kv_quest_dense_layers=1)
    for rows, lens in LENS.items():
        (a, ca), (b, cb) = _step_and_forward(eng, lens, seed=rows)
        assert a is not None and torch.equal(a, b), f"rows {rows}: max |diff| {(a - b).abs().max().item():.3g}"
        for name, x, y in zip(("k", "v", "k_scale", "v_scale")[:len(ca) - 2] + ("k_min", "k_max"), ca, cb):
            if x.dtype == kv_quant.FP8:  # the code bytes (torch.equal has no float8 kernel)
                x, y = x.view(torch.uint8), y.view(torch.uint8)
            assert torch.equal(x, y), f"rows {rows}: {name} differs"
    # and the sparse rows really differ from dense attention
    lens = LENS[4]
    (a, _), _ = _step_and_forward(eng, lens, seed=4)
    (dense, _), _ = _step_and_forward(eng, lens, seed=4, dense=True)
    assert torch.equal(a[1], dense[1]) and not torch.equal(a[3], dense[3])  # topk 0, topk 5 of 40 blocks


@pytest.mark.parametrize("kv_dtype", ["float32", "int8", "fp8"])
def test_greedy_quest_fused_on_and_off(hf_dirs, kv_dtype):
    """Greedy generation with the step equals the op-by-op engine, alone and batched, every decode
    step and short prompt chunk in the step (only the long prompt chunks fell back)."""
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (160, 7, 90, 133)]
    sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, kv_policy="quest", kv_budget=32)
    kw = dict(kv_policy="quest", kv_budget=32, kv_quest_dense_layers=0)
    on = _engine(hf_dirs["qwen3"], threads=2, kv_dtype=kv_dtype, **kw)
    fused = on.runner.fused
    assert fused is not None
    batched = on.generate(prompts, sp)
    single = [on.generate([p], sp)[0] for p in prompts]
    assert fused.steps > 0 and set(fused.fallbacks) == {"the step has prefill tokens (more than 32 rows)"}
    off = _engine(hf_dirs["qwen3"], threads=2, fused=False, kv_dtype=kv_dtype, **kw)
    assert off.runner.fused is None
    plain = off.generate(prompts, sp)
    assert [o.token_ids for o in batched] == [o.token_ids for o in single] == [o.token_ids for o in plain]


def test_avx2_env_quest_greedy_tokens_fused_on_and_off(tmp_path):
    """LLMOPT_CPU_PATH=avx2 (every machine's floor) and LLMOPT_FUSED_DECODE=0 / 1 in fresh processes,
    quest over 4-token blocks (contexts of 3-15 tokens: up to 4 blocks, 2 read): the same tokens."""
    if "avx2" not in G.available_paths():
        pytest.skip("no AVX2 build")
    m = tiny_hf_model("llama", hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, num_hidden_layers=2)
    path = save_hf_dir(m, tmp_path / "llama")
    got = avx2_greedy_fused_on_and_off(path, "block_size=4, kv_policy='quest', kv_budget=4, kv_quest_dense_layers=0")
    assert got["1"].split(" ", 3)[3] == got["0"].split(" ", 3)[3]
