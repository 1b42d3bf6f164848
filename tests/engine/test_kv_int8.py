"""The 8-bit KV caches (int8, fp8 e4m3) in the engine: batch invariance, closeness to the float cache, compression
moving scales with the rows, memory accounting and bad input."""

import pytest
import torch

from llmopt import LLM, SamplingParams
from llmopt.config import EngineConfig

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def _prompts(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(5, 90, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("policy,budget", [("full", None), ("streaming", 20), ("snapkv", 0.3)])
def test_int8_batched_greedy_matches_single(llama_dir, policy, budget, kv_dtype):
    kw = dict(kv_dtype=kv_dtype, kv_cache_memory_gb=0.05, block_size=8, kv_window=8, kv_policy=policy, kv_budget=budget)
    alone = LLM(llama_dir, max_num_seqs=1, **kw)
    singles = [alone.generate([p], GREEDY)[0].token_ids for p in _prompts()]
    outs = LLM(llama_dir, max_num_batched_tokens=40, **kw).generate(_prompts(), GREEDY)
    assert [o.token_ids for o in outs] == singles


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_int8_cache_scores_close_to_the_float_cache(llama_dir, kv_dtype):
    ids = _prompts(1, seed=5)[0] + _prompts(1, seed=6)[0]
    f32 = LLM(llama_dir, kv_cache_memory_gb=0.05).score(ids)
    llm8 = LLM(llama_dir, kv_cache_memory_gb=0.05, kv_dtype=kv_dtype)
    i8 = llm8.score(ids)
    assert llm8.engine.block_manager.num_used_blocks == 0  # the borrowed blocks went back
    diff = (i8 - f32).abs()
    assert float(diff.max()) < 0.05, float(diff.max())
    assert float(diff.max()) > 0  # the scores really went through the quantized cache


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_int8_decode_logits_match_the_float_reference_within_quantization(tiny_models, kv_dtype):
    """The first generated tokens of a float and an 8-bit cache agree on a tiny model."""
    d = str(tiny_models["qwen2"][1])
    p = _prompts(3, seed=7)
    a = LLM(d, kv_cache_memory_gb=0.05).generate(p, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    b = LLM(d, kv_cache_memory_gb=0.05, kv_dtype=kv_dtype).generate(p, SamplingParams(max_tokens=4, temperature=0.0,
                                                                                       ignore_eos=True))
    agree = sum(x == y for oa, ob in zip(a, b) for x, y in zip(oa.token_ids, ob.token_ids))
    assert agree >= 10, (agree, [o.token_ids for o in a], [o.token_ids for o in b])


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_int8_cache_holds_3_7x_the_tokens_in_the_same_memory(llama_dir, kv_dtype):
    f = LLM(llama_dir, kv_cache_memory_gb=0.01).engine
    q = LLM(llama_dir, kv_cache_memory_gb=0.01, kv_dtype=kv_dtype).engine
    c = f.model_config
    assert q.kv_info()["bytes_per_token"] == 2 * c.num_layers * c.num_kv_heads * (c.head_dim + 4)
    ratio = q.block_manager.num_blocks / f.block_manager.num_blocks
    assert abs(ratio - 4 * c.head_dim / (c.head_dim + 4)) < 0.05


def test_bad_kv_dtype_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="kv_dtype must be one of"):
        EngineConfig(kv_dtype="int4")
    with pytest.raises(ValueError, match="leave kv_dtype unset or use 'int8' or 'fp8'"):
        EngineConfig(kv_dtype="bfloat16")
