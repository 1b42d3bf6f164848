"""KV compression policies (engine/kv_policy.py): real blocks freed, true positions kept, greedy
determinism and batch invariance, SnapKV's choice against Hugging Face's attention weights, and
clear errors for bad budgets."""

import math

import pytest
import torch

from llmopt import LLM, SamplingParams
from llmopt.config import EngineConfig, KVPolicy, parse_kv_budget
from llmopt.engine.kv_policy import observation_scores, snapkv_keep
from tests.conftest import random_prompts

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
KW = dict(kv_cache_memory_gb=0.05, block_size=8, kv_sinks=4, kv_window=8)


def _prompts(n=6, seed=0, lo=40, hi=120):
    return random_prompts(n, seed, lo, hi)


POLICIES = [("streaming", 24), ("streaming", 0.25), ("snapkv", 24), ("snapkv", 0.25)]


@pytest.mark.parametrize("policy,budget", POLICIES)
def test_compressed_batch_matches_each_sequence_alone(llama_dir, policy, budget):
    alone = LLM(llama_dir, max_num_seqs=1, kv_policy=policy, kv_budget=budget, **KW)
    singles = [alone.generate([p], GREEDY)[0].token_ids for p in _prompts()]
    # a small token budget chunks the prefills differently from the runs alone
    batched = LLM(llama_dir, kv_policy=policy, kv_budget=budget, max_num_batched_tokens=50, **KW)
    outs = batched.generate(_prompts(), GREEDY)
    assert [o.token_ids for o in outs] == singles
    assert batched.engine.block_manager.num_used_blocks == 0
    again = alone.generate(_prompts()[:2], GREEDY)
    assert [o.token_ids for o in again] == singles[:2]


@pytest.mark.parametrize("policy", ["streaming", "snapkv"])
def test_compression_frees_blocks_and_keeps_true_positions(llama_dir, policy):
    llm = LLM(llama_dir, kv_policy=policy, kv_budget=24, **KW)
    eng = llm.engine
    seq = eng.add_request(list(range(3, 103)), SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    while seq.num_computed_tokens < 100:
        eng.step()
    # prefill done: the budget's worth of rows stay (streaming rounds to whole blocks)
    assert seq.num_computed_tokens == 101 or seq.num_computed_tokens == 100
    if policy == "snapkv":
        assert seq.kv_len == 24 + (seq.num_computed_tokens - 100)
    else:
        assert 24 <= seq.kv_len < 24 + 8
    assert len(seq.block_table) == math.ceil(seq.kv_len / 8)
    assert eng.block_manager.num_used_blocks == len(seq.block_table)
    while not seq.finished:
        eng.step()
        assert seq.finished or seq.num_evicted + seq.kv_len == seq.num_computed_tokens
        if policy == "streaming" and not seq.finished:
            assert seq.kv_len < 24 + 8  # decode keeps evicting
    assert len(seq.output_ids) == 30
    assert eng.block_manager.num_used_blocks == 0


def test_budget_not_below_the_prompt_is_a_no_op(llama_dir):
    full = LLM(llama_dir, **KW).generate(_prompts(3), GREEDY)
    snap = LLM(llama_dir, kv_policy="snapkv", kv_budget=1.0, **KW).generate(_prompts(3), GREEDY)
    stream = LLM(llama_dir, kv_policy="streaming", kv_budget=10_000, **KW).generate(_prompts(3), GREEDY)
    assert [o.token_ids for o in snap] == [o.token_ids for o in full] == [o.token_ids for o in stream]
    assert [o.kv_tokens for o in snap] == [len(p) + 19 for p in _prompts(3)]


def test_per_request_policy_overrides_the_engine(llama_dir):
    llm = LLM(llama_dir, **KW)
    p = _prompts(1)[0]
    full = llm.generate([p], GREEDY)[0]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, kv_policy="streaming", kv_budget=12)
    comp = llm.generate([p], params)[0]
    ref = LLM(llama_dir, kv_policy="streaming", kv_budget=12, **KW).generate([p], GREEDY)[0]
    assert comp.token_ids == ref.token_ids
    assert comp.kv_tokens < full.kv_tokens


def test_snapkv_keeps_the_positions_hf_attention_ranks_highest(tiny_models):
    """The observation scores from our paged prefill equal those summed from transformers' own
    attention weights (eager), and the kept rows are their pooled top-k plus the window."""
    hf, d, _ = tiny_models["llama"]
    hf.config._attn_implementation = "eager"
    ids = _prompts(1, seed=3, lo=90, hi=91)[0]
    with torch.no_grad():
        att = hf(torch.tensor([ids]), output_attentions=True).attentions  # [1, Hq, C, C] per layer
    W, keep = 8, 30
    llm = LLM(str(d), kv_policy="snapkv", kv_budget=keep, **KW)
    eng = llm.engine
    seq = eng.add_request(ids, SamplingParams(max_tokens=1, temperature=0.0))
    eng.step()
    observed = eng.runner.observed[seq.seq_id]
    Hq, Hk = hf.config.num_attention_heads, hf.config.num_key_value_heads
    for layer, a in enumerate(att):
        ref = a[0, :, -W:, :].reshape(Hk, Hq // Hk, W, -1).sum((1, 2))
        torch.testing.assert_close(observed[layer], ref.float(), rtol=1e-4, atol=1e-5)
        rows = snapkv_keep(ref.float(), keep, W, 7)
        assert rows.shape == (Hk, keep)
        assert rows[:, -W:].tolist() == [list(range(len(ids) - W, len(ids)))] * Hk


def _max_pooled_reference(scores: torch.Tensor, prefix: int, pool: int) -> torch.Tensor:
    """SnapKV's pooling written out: row j of the prefix scores max(scores[j - pool//2 .. j + pool//2])
    over the prefix rows."""
    r = pool // 2
    return torch.stack([scores[:, max(0, j - r):min(prefix, j + r + 1)].amax(1) for j in range(prefix)], 1)


@pytest.mark.parametrize("pool", [1, 5, 15])
def test_snapkv_keeps_the_rows_a_reference_computation_of_the_method_picks(tiny_models, pool):
    """End to end on a GQA model: the rows the engine compacts to are, per layer and kv head, the
    top ``budget - window`` prefix positions by the method computed from transformers' own eager
    attention weights (window queries' softmax summed over the window and the group, max-pooled
    over ``pool`` positions), plus the window; and the compacted cache holds exactly those rows."""
    hf, d, _ = tiny_models["llama"]
    hf.config._attn_implementation = "eager"
    ids = _prompts(1, seed=5, lo=90, hi=91)[0]
    with torch.no_grad():
        att = hf(torch.tensor([ids]), output_attentions=True).attentions
    W, keep, C = 8, 30, len(ids)
    llm = LLM(str(d), kv_policy="snapkv", kv_budget=keep, kv_pool=pool, **KW)
    eng = llm.engine
    comp = eng.compressor
    seen = {}
    orig = comp._keep_rows

    def spy(seq, rows):
        seen["rows"], seen["before"] = rows.clone(), [c.clone() for c in comp.caches]
        seen["table"] = list(seq.block_table)
        orig(seq, rows)
        seen["after"] = list(seq.block_table)

    comp._keep_rows = spy
    eng.add_request(ids, SamplingParams(max_tokens=1, temperature=0.0))
    eng.step()
    rows = seen["rows"]
    Hq, Hk = hf.config.num_attention_heads, hf.config.num_key_value_heads
    assert Hq > Hk and rows.shape == (len(att), Hk, keep)
    bs = KW["block_size"]
    for layer, a in enumerate(att):
        votes = a[0, :, -W:, :].reshape(Hk, Hq // Hk, W, C).sum((1, 2)).float()
        pooled = _max_pooled_reference(votes, C - W, pool)
        for h in range(Hk):
            kept = rows[layer, h].tolist()
            assert kept[-W:] == list(range(C - W, C)) and kept == sorted(set(kept))
            chosen = torch.zeros(C - W, dtype=torch.bool)
            chosen[kept[:-W]] = True
            # a top-k of the reference scores (up to float noise between the two attentions)
            assert pooled[h][chosen].min() >= pooled[h][~chosen].max() - 1e-5
    # the cache after compaction holds the chosen rows, in order, for every layer and head
    k_before, k_after = seen["before"][0], comp.caches[0]
    for layer in range(len(att)):
        for h in range(Hk):
            for r, src in enumerate(rows[layer, h].tolist()):
                b0, o0 = seen["table"][src // bs], src % bs
                b1, o1 = seen["after"][r // bs], r % bs
                assert torch.equal(k_after[layer, b1, o1, h], k_before[layer, b0, o0, h])


def test_snapkv_keeps_the_neighbourhood_of_a_sharp_hit_over_a_broad_plateau():
    """Max-pooling: one sharp attention hit wins its whole ``pool`` neighbourhood, against a broad
    region of middling scores that an average would prefer (the later digits of a number the
    window found, which decode reads in heads that never looked there during the window)."""
    scores = torch.zeros(1, 40)
    scores[0, 10] = 1.0
    scores[0, 20:30] = 0.3
    rows = snapkv_keep(scores, keep=5 + 4, window=4, pool=5)
    assert rows[0].tolist() == [8, 9, 10, 11, 12, 36, 37, 38, 39]
    with pytest.raises(ValueError, match="odd"):
        snapkv_keep(scores, keep=9, window=4, pool=4)


def test_snapkv_selection_picks_the_top_pooled_rows():
    scores = torch.zeros(2, 20)
    scores[0, 3] = 5.0
    scores[1, 9] = 5.0
    rows = snapkv_keep(scores, keep=7, window=4, pool=1)
    assert rows[0].tolist()[-4:] == [16, 17, 18, 19] and 3 in rows[0].tolist()
    assert 9 in rows[1].tolist() and rows.shape == (2, 7)
    q, k = torch.randn(4, 4, 8), torch.randn(20, 2, 8)
    s = observation_scores(q, k, 0.3)
    torch.testing.assert_close(s.sum(1), torch.full((2,), 8.0))  # 4 queries x 2 heads per group, each sums to 1


def test_bad_policies_and_budgets_are_refused_with_a_reason(llama_dir):
    with pytest.raises(ValueError, match="kv_sinks 4"):
        EngineConfig(kv_policy="streaming", kv_budget=3)
    with pytest.raises(ValueError, match="observation window"):
        EngineConfig(kv_policy="snapkv", kv_budget=16)
    with pytest.raises(ValueError, match="needs kv_budget"):
        EngineConfig(kv_policy="snapkv")
    with pytest.raises(ValueError, match="kv_policy must be one of"):
        EngineConfig(kv_policy="pyramidkv", kv_budget=0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        EngineConfig(kv_policy="streaming", kv_budget=1.5)
    with pytest.raises(ValueError, match="'full' policy keeps everything"):
        EngineConfig(kv_budget=0.5)
    with pytest.raises(ValueError, match="kv_sinks must be"):
        EngineConfig(kv_policy="streaming", kv_budget=0.5, kv_sinks=17)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(kv_policy="snapkv", kv_budget=0.5, max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="needs kv_policy"):
        SamplingParams(kv_budget=0.5)
    with pytest.raises(ValueError, match="fraction like 0.25"):
        parse_kv_budget("quarter")
    assert parse_kv_budget("0.25") == 0.25 and parse_kv_budget("2048") == 2048
    assert KVPolicy("snapkv", 0.25, window=32).tokens(1000) == 250
    assert KVPolicy("snapkv", 0.01, window=32).tokens(1000) == 32  # a fraction never keeps less than the window
    assert KVPolicy("streaming", 5000).tokens(1000) is None  # budget beyond the prompt: no-op
