"""The float16 KV cache (``EngineConfig(kv_dtype="float16")``: a float32 model's K/V stored at half the bytes,
llama.cpp's default cache type). The native walks convert each tile's halves to floats and run the float
attention on them, so an output equals the float32 kernel's on a float32 cache holding the same rounded
values, bit for bit; the one-call decode step writes the halves the op-by-op forward writes and reads them
the same way; greedy tokens are batch invariant and the same with the step on and off."""

from __future__ import annotations

import pytest
import torch

from llmopt import LLM, SamplingParams
from llmopt.config import EngineConfig, KernelSettings
from llmopt.engine.engine import LLMEngine
from llmopt.kernels import decode_step, ops
from llmopt.kernels import gguf_linear as G
from tests.conftest import avx2_greedy_fused_on_and_off, fused_and_forward, native_or_skip, save_hf_dir, tiny_hf_model
from tests.engine.test_fused_decode_kv_int8 import LENS, q4_1_file  # noqa: F401  (a fixture)
from tests.kernels.test_prefill_attention import _batch

BS = 16
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def ext():
    return native_or_skip(ops._native(), "llmopt_fused")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """llama (no biases) and qwen3 (q/k norms before rope and the cache write); GQA groups of 2, head_dim 18
    (the conversion's scalar tail)."""
    root = tmp_path_factory.mktemp("kv16")
    out = {}
    for arch in ("llama", "qwen3"):
        m = tiny_hf_model(arch, hidden_size=72, intermediate_size=100, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=18, num_hidden_layers=2)
        out[arch] = save_hf_dir(m, root / arch)
    return out


def _engine(path, threads: int = 1, fused: bool = True, **kw) -> LLMEngine:
    cfg = EngineConfig(num_threads=threads, num_kv_blocks=160, block_size=BS, kv_dtype="float16",
                       kernels=KernelSettings(fused_decode=fused), **kw)
    return LLMEngine(str(path), cfg)


@pytest.mark.parametrize("D,hk,G", [(64, 3, 3), (128, 2, 4), (18, 2, 2), (64, 1, 1)])
@pytest.mark.parametrize("window", [-1, 45])
def test_float16_walk_equals_the_float_walk_on_the_rounded_cache(ext, D, hk, G, window):
    """Decode rows (walked whole and per kv head), long rows split into token chunks, prompts' grouped rows and
    even splits: every output bit is the float32 kernel's on the cache converted back to float32."""
    spans = [(40, 1), (130, 1), (0, 1), (700, 1), (0, 70), (64, 1), (96, 37), (5, 1), (1500, 1), (31, 33)]
    q, kc, vc, bt, cl = _batch(D * 7 + hk, spans, BS, hk=hk, G=G, D=D)
    kh, vh = kc.half(), vc.half()
    for splits, rows in [(0, 1), (0, 16), (3, 1)]:
        got = ext.paged_decode_attention(q, kh, vh, bt, cl, 0.125, window, splits, rows)
        want = ext.paged_decode_attention(q, kh.float(), vh.float(), bt, cl, 0.125, window, splits, rows)
        assert torch.equal(got, want), (splits, rows, (got - want).abs().max())
    # decode rows only, enough of them for the whole-row walk on 2 threads
    dq, dbt, dcl = q[[0, 1, 3, 5, 7, 8]], bt[[0, 1, 3, 5, 7, 8]], cl[[0, 1, 3, 5, 7, 8]]
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got = ext.paged_decode_attention(dq, kh, vh, dbt, dcl, 0.125, window, 0, 1)
            assert torch.equal(got, ext.paged_decode_attention(dq, kh.float(), vh.float(), dbt, dcl, 0.125, window, 0, 1))
    finally:
        torch.set_num_threads(old)
    # the public op takes the native path for a float16 cache, and agrees with the torch reference
    sw = None if window < 0 else window
    out = ops.paged_decode_attention(q, kh, vh, bt, cl, 0.125, sw)
    assert torch.equal(out, ext.paged_decode_attention(q, kh.float(), vh.float(), bt, cl, 0.125, window, 0, 16))
    torch.testing.assert_close(out, ops.paged_decode_attention_ref(q, kh, vh, bt, cl, 0.125, sw), rtol=1e-5, atol=1e-5)


def test_float16_cache_with_mismatched_k_and_v_is_refused(ext):
    q, kc, vc, bt, cl = _batch(1, [(10, 1)], BS, hk=1, G=2, D=64)
    with pytest.raises(RuntimeError, match="one dtype"):
        ext.paged_decode_attention(q, kc.half(), vc, bt, cl, 0.125, -1, 0, 1)
    with pytest.raises(RuntimeError, match="float32 or float16"):
        ext.paged_decode_attention(q, kc.bfloat16(), vc.bfloat16(), bt, cl, 0.125, -1, 0, 1)


@pytest.mark.skipif(decode_step._native() is None, reason="native decode step unavailable")
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("threads", [1, 2])
def test_float16_kv_step_bit_identical_to_the_forward(hf_dirs, arch, threads):
    """The step's hidden states and the halves it wrote equal the op-by-op forward's (which writes
    ``k.to(float16)`` and reads through the native float16 walk)."""
    eng = _engine(hf_dirs[arch], threads=threads)
    assert eng.runner.k_cache.dtype == torch.float16
    assert eng.runner.fused is not None and eng.runner.fused.kv_dtype == torch.float16
    for rows, lens in LENS.items():
        a, ca, b, cb = fused_and_forward(eng, lens, BS, seed=rows)
        assert a is not None and torch.equal(a, b), f"rows {rows}: max |diff| {(a - b).abs().max().item():.3g}"
        assert len(ca) == 2 and all(torch.equal(x, y) for x, y in zip(ca, cb)), f"rows {rows}: the caches differ"


@pytest.mark.skipif(decode_step._native() is None, reason="native decode step unavailable")
def test_float16_kv_step_bit_identical_on_gguf_q4_1(q4_1_file):  # noqa: F811
    eng = _engine(q4_1_file, threads=2)
    assert eng.runner.fused is not None
    for rows, lens in LENS.items():
        a, _, b, _ = fused_and_forward(eng, lens, BS, seed=rows)
        assert torch.equal(a, b), rows


@pytest.mark.skipif(decode_step._native() is None, reason="native decode step unavailable")
@pytest.mark.parametrize("policy,budget", [(None, None), ("streaming", 24), ("snapkv", 0.3), ("h2o", 30)])
def test_float16_greedy_batched_single_and_fused_off_agree(hf_dirs, policy, budget):
    """Batched = single = op by op, under the KV policies; h2o rows take the op-by-op forward (counted as a
    fallback, never an error)."""
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (60, 7, 90, 33)]
    sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, kv_policy=policy, kv_budget=budget)
    kw = dict(kv_window=8) if policy in ("snapkv", "h2o") else {}
    on = _engine(hf_dirs["qwen3"], threads=2, **kw)
    batched = on.generate(prompts, sp)
    single = [on.generate([p], sp)[0] for p in prompts]
    fused = on.runner.fused
    assert fused is not None
    if policy == "h2o":
        assert any("float16" in why for why in fused.fallbacks)
    else:
        assert fused.steps > 0
    plain = _engine(hf_dirs["qwen3"], threads=2, fused=False, **kw).generate(prompts, sp)
    assert [o.token_ids for o in batched] == [o.token_ids for o in single] == [o.token_ids for o in plain]


def test_float16_cache_scores_through_the_cache_close_to_float32(llama_dir):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 256, (120,), generator=g).tolist()
    f32 = LLM(llama_dir, kv_cache_memory_gb=0.05).score(ids)
    llm = LLM(llama_dir, kv_cache_memory_gb=0.05, kv_dtype="float16")
    h = llm.score(ids)
    assert llm.engine.block_manager.num_used_blocks == 0  # the borrowed blocks went back
    diff = (h - f32).abs()
    assert 0 < float(diff.max()) < 0.01, float(diff.max())  # through the rounded cache, and close


def test_float16_cache_holds_twice_the_tokens(llama_dir):
    f = LLM(llama_dir, kv_cache_memory_gb=0.01).engine
    h = LLM(llama_dir, kv_cache_memory_gb=0.01, kv_dtype="float16").engine
    c = f.model_config
    assert h.kv_info()["bytes_per_token"] == 2 * c.num_layers * c.num_kv_heads * c.head_dim * 2
    assert abs(h.block_manager.num_blocks / f.block_manager.num_blocks - 2) < 0.05
    outs = LLM(llama_dir, kv_cache_memory_gb=0.01, kv_dtype="float16").generate([[1, 2, 3]], GREEDY)
    assert len(outs[0].token_ids) == 16


def test_float16_kv_bad_combinations_are_refused():
    with pytest.raises(ValueError, match="kv_dtype float16 stores a float32 model's K/V"):
        EngineConfig(kv_dtype="float16", dtype="bfloat16")
    with pytest.raises(ValueError, match="'quest' does not read a float16 KV cache"):
        EngineConfig(kv_dtype="float16", kv_policy="quest", kv_budget=64)


def test_avx2_env_float16_kv_greedy_tokens_fused_on_and_off(q4_1_file):  # noqa: F811
    """LLMOPT_CPU_PATH=avx2 (every machine's floor), the step on and off in fresh processes: the same tokens."""
    if "avx2" not in G.available_paths():
        pytest.skip("no AVX2 build")
    got = avx2_greedy_fused_on_and_off(q4_1_file, "kv_dtype='float16'")
    assert got["1"].split(" ", 3)[3] == got["0"].split(" ", 3)[3]
