"""kv_policy 'quest' (sparse decode attention over per-block key summaries) in the engine: the
summaries hold each block's true key min / max, a budget covering the context is full attention
bit for bit, batched equals alone, it really reads fewer blocks, and bad settings are refused."""

import pytest
import torch

from llmopt import LLM, SamplingParams
from llmopt.config import EngineConfig
from llmopt.kernels import kv_quant, quest
from tests.conftest import random_prompts

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=0)
KW = dict(kv_cache_memory_gb=0.05, block_size=8, kv_quest_dense_layers=0)


def _prompts(n=5, seed=0, lo=60, hi=140):
    return random_prompts(n, seed, lo, hi)


def _quest(params: SamplingParams, budget) -> SamplingParams:
    return SamplingParams(max_tokens=params.max_tokens, temperature=0.0, ignore_eos=True, logprobs=0,
                          kv_policy="quest", kv_budget=budget)


@pytest.mark.parametrize("kv_dtype", [None, "int8", "fp8"])
def test_summaries_are_each_blocks_key_min_and_max(llama_dir, kv_dtype):
    llm = LLM(llama_dir, kv_policy="quest", kv_budget=16, kv_dtype=kv_dtype, max_num_batched_tokens=40, **KW)
    eng = llm.engine
    seq = eng.add_request(_prompts(1)[0], _quest(GREEDY, 16))
    while not seq.finished:
        eng.step()
        r = eng.runner
        assert r.k_min is not None and r.k_max is not None
        n = seq.kv_len
        for j, blk in enumerate(seq.block_table):
            rows = min(8, n - 8 * j)
            if rows <= 0:
                break
            k = r.k_cache[:, blk, :rows]
            if r.k_scale is not None:  # int8: the dequantized rows attention reads
                k = kv_quant.dequantize_kv(k, r.k_scale[:, blk, :rows])
            assert torch.equal(r.k_min[:, blk], k.amin(1)) and torch.equal(r.k_max[:, blk], k.amax(1))


def test_budget_covering_the_context_is_full_attention_bit_for_bit(llama_dir):
    full = LLM(llama_dir, **KW).generate(_prompts(), GREEDY)
    llm = LLM(llama_dir, kv_policy="quest", kv_budget=1.0, **KW)
    for budget in (1.0, 10_000):
        outs = llm.generate(_prompts(), _quest(GREEDY, budget))
        assert [o.token_ids for o in outs] == [o.token_ids for o in full]
        assert [o.logprobs for o in outs] == [o.logprobs for o in full]
    # and per request "full" on a quest engine
    outs = llm.generate(_prompts(), SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=0,
                                                   kv_policy="full"))
    assert [o.logprobs for o in outs] == [o.logprobs for o in full]


@pytest.mark.parametrize("kv_dtype,budget", [(None, 16), (None, 0.2), ("int8", 24)])
def test_quest_batch_matches_each_sequence_alone(llama_dir, kv_dtype, budget):
    alone = LLM(llama_dir, max_num_seqs=1, kv_policy="quest", kv_budget=budget, kv_dtype=kv_dtype, **KW)
    singles = [alone.generate([p], _quest(GREEDY, budget))[0] for p in _prompts()]
    batched = LLM(llama_dir, kv_policy="quest", kv_budget=budget, kv_dtype=kv_dtype, max_num_batched_tokens=50,
                  enable_prefix_caching=False, **KW)
    outs = batched.generate(_prompts(), _quest(GREEDY, budget))
    # tokens (the fp32 linears' sums depend on the batch's row count, for every policy)
    assert [o.token_ids for o in outs] == [o.token_ids for o in singles]
    # the prefix cache serves quest requests (blocks are read, never rewritten)
    before = alone.engine.stats["computed_prefill_tokens"]
    again = alone.generate(_prompts()[:2], _quest(GREEDY, budget))
    assert [o.token_ids for o in again] == [o.token_ids for o in singles[:2]]
    assert alone.engine.stats["computed_prefill_tokens"] - before < sum(len(p) for p in _prompts()[:2]) // 2


def test_a_small_budget_reads_fewer_blocks_and_changes_the_output(llama_dir):
    full = LLM(llama_dir, **KW).generate(_prompts(), GREEDY)
    sparse = LLM(llama_dir, kv_policy="quest", kv_budget=16, **KW).generate(_prompts(), _quest(GREEDY, 16))
    assert [o.logprobs for o in sparse] != [o.logprobs for o in full]
    assert all(o.kv_tokens == f.kv_tokens for o, f in zip(sparse, full))  # quest frees nothing


def test_dense_layers_attend_to_every_block(llama_dir):
    """With every layer dense (the tiny model has 2), quest is full attention."""
    full = LLM(llama_dir, **KW).generate(_prompts(3), GREEDY)
    kw = dict(KW, kv_quest_dense_layers=2)
    outs = LLM(llama_dir, kv_policy="quest", kv_budget=16, **kw).generate(_prompts(3), _quest(GREEDY, 16))
    assert [o.logprobs for o in outs] == [o.logprobs for o in full]


def test_quest_settings_are_checked_with_a_reason(llama_dir):
    with pytest.raises(ValueError, match="needs kv_budget"):
        EngineConfig(kv_policy="quest")
    with pytest.raises(ValueError, match="fraction"):
        EngineConfig(kv_policy="quest", kv_budget=1.5)
    with pytest.raises(ValueError, match=">= 1"):
        EngineConfig(kv_policy="quest", kv_budget=0)
    with pytest.raises(ValueError, match="kv_quest_dense_layers"):
        EngineConfig(kv_policy="quest", kv_budget=0.25, kv_quest_dense_layers=-1)
    with pytest.raises(ValueError, match="in the same request"):
        SamplingParams(kv_budget=0.25)
    plain = LLM(llama_dir, **KW)
    with pytest.raises(ValueError, match="EngineConfig\\(kv_policy='quest'\\)"):
        plain.generate([_prompts(1)[0]], _quest(GREEDY, 0.25))


def test_quest_kernel_in_the_model_matches_its_reference(llama_dir):
    """The layer's decode attention under quest equals the torch reference over the engine's own
    cache and summaries (the selection the kernel made is the reference's)."""
    llm = LLM(llama_dir, kv_policy="quest", kv_budget=16, **KW)
    eng = llm.engine
    seq = eng.add_request(_prompts(1)[0], _quest(GREEDY, 16))
    while not seq.output_ids:
        eng.step()
    r = eng.runner
    attn = eng.model.layers[1].self_attn
    L = seq.kv_len
    tables = torch.tensor([seq.block_table], dtype=torch.int32)
    cl = torch.tensor([L], dtype=torch.int32)
    topk = torch.tensor([r.quest_topk(seq, L)], dtype=torch.int32)
    assert 0 < int(topk[0]) < len(seq.block_table)
    q = torch.randn(1, attn.num_heads, attn.head_dim)
    got = quest.quest_decode_attention(q, attn.k_cache, attn.v_cache, None, None, attn.k_min, attn.k_max, tables, cl,
                                       topk, attn.scale)
    want = quest.quest_decode_attention_ref(q, attn.k_cache, attn.v_cache, None, None, attn.k_min, attn.k_max, tables,
                                            cl, topk, attn.scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
