"""The engine: continuous batching, paged KV, prefix caching, preemption, sampling, stops."""

import pytest
import torch

from llmopt import LLM, SamplingParams
from llmopt.engine.engine import PromptTooLongError

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _prompts(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(3, 90, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def singles(llama_dir):
    llm = LLM(llama_dir, kv_cache_memory_gb=0.05, max_num_seqs=1)
    return [llm.generate([p], GREEDY)[0].token_ids for p in _prompts()]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_batched_greedy_matches_single(llama_dir, singles, prefix_caching):
    llm = LLM(llama_dir, kv_cache_memory_gb=0.05, enable_prefix_caching=prefix_caching)
    outs = llm.generate(_prompts(), GREEDY)
    assert [o.token_ids for o in outs] == singles


def test_batched_greedy_matches_single_under_preemption(llama_dir, singles):
    # 24 blocks of 8 tokens cannot hold 16 sequences of up to ~113 tokens: the scheduler must preempt
    llm = LLM(llama_dir, num_kv_blocks=24, block_size=8)
    outs = llm.generate(_prompts(), GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == singles
    assert llm.engine.block_manager.num_used_blocks == 0


def test_chunked_prefill_matches_whole_prefill(llama_dir, singles):
    llm = LLM(llama_dir, kv_cache_memory_gb=0.05, max_num_batched_tokens=7)
    outs = llm.generate(_prompts(), GREEDY)
    assert [o.token_ids for o in outs] == singles


def test_engine_matches_transformers_on_qwen3(tiny_models):
    hf, d, _ = tiny_models["qwen3"]
    llm = LLM(str(d), kv_cache_memory_gb=0.05, block_size=4, max_num_batched_tokens=16)
    prompts = _prompts(5, seed=3)
    outs = llm.generate(prompts, GREEDY)
    for p, o in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert o.token_ids == ref[0, len(p):].tolist()


def test_prefix_cache_reuses_shared_prefix(llama_dir):
    llm = LLM(llama_dir, kv_cache_memory_gb=0.05, block_size=16)
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(0, 256, (200,), generator=g).tolist()
    a = prefix + torch.randint(0, 256, (10,), generator=g).tolist()
    b = prefix + torch.randint(0, 256, (12,), generator=g).tolist()
    p = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate([a], p)
    before = llm.engine.stats["computed_prefill_tokens"]
    out_b = llm.generate([b], p)[0]
    computed = llm.engine.stats["computed_prefill_tokens"] - before
    # 200 shared tokens = 12 full blocks of 16 (192 tokens) cached; at most one block of the prefix is redone
    assert out_b.num_cached_tokens == 192
    assert computed <= len(b) - 200 + 16
    cold = LLM(llama_dir, kv_cache_memory_gb=0.05, enable_prefix_caching=False)
    assert cold.generate([b], p)[0].token_ids == out_b.token_ids
    # after a weight change the cached blocks are stale: reset_prefix_cache forgets them all
    assert llm.engine.reset_prefix_cache() >= 12
    before = llm.engine.stats["computed_prefill_tokens"]
    again = llm.generate([b], p)[0]
    assert again.num_cached_tokens == 0 and llm.engine.stats["computed_prefill_tokens"] - before == len(b)
    assert again.token_ids == out_b.token_ids


def test_seeded_sample_same_alone_and_in_batch(llama_dir):
    llm = LLM(llama_dir, kv_cache_memory_gb=0.05)
    sp = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    prompt = _prompts(1, seed=9)[0]
    alone = llm.generate([prompt], sp)[0].token_ids
    others = [SamplingParams(max_tokens=20, temperature=1.0, seed=i, ignore_eos=True) for i in range(15)]
    batch = llm.generate([prompt] + _prompts(15, seed=10), [sp] + others)
    assert batch[0].token_ids == alone
    again = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=4321,
                                                  ignore_eos=True))[0].token_ids
    assert again != alone  # the seed matters


def test_stop_conditions_and_logprobs(llama_dir):
    llm = LLM(llama_dir, kv_cache_memory_gb=0.05)
    prompt = _prompts(1, seed=11)[0]
    full = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 30
    # a stop token id ends generation at that token
    stop_id = full.token_ids[5]
    first = full.token_ids.index(stop_id)
    o = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop_id]))[0]
    assert o.finish_reason == "stop" and o.token_ids == full.token_ids[:first + 1]
    # a stop string is cut from the text
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    if stop.strip():
        o = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, stop=[stop], ignore_eos=True))[0]
        assert o.finish_reason == "stop" and stop not in o.text and text.startswith(o.text)
    # logprobs: the chosen greedy token is the best one
    o = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True))[0]
    assert len(o.logprobs) == 5
    for lp, tok in zip(o.logprobs, o.token_ids):
        assert lp.token_id == tok and lp.top[0][0] == tok and len(lp.top) == 3
        assert abs(lp.top[0][1] - lp.logprob) < 1e-6 and lp.logprob <= 0


def _stream(llm, prompt, params):
    """Step the engine by hand; return the deltas of one request and its final text."""
    eng = llm.engine
    seq = eng.add_request(prompt, params)
    deltas = []
    while not seq.finished:
        deltas += [o.delta for o in eng.step() if o.request_id == seq.request_id]
    return deltas, seq.text


def test_streamed_deltas_never_leak_a_stop_string(llama_dir):
    llm = LLM(llama_dir, kv_cache_memory_gb=0.05)
    prompt = _prompts(1, seed=11)[0]
    free = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    deltas, text = _stream(llm, prompt, free)
    assert "".join(deltas) == text and len(deltas) == 30
    # a stop string that spans two tokens: the end of one token's text and the start of the next
    pieces = [d for d in deltas if d.strip()]
    assert len(pieces) >= 4, "the tiny model should produce visible text"
    a, b = pieces[len(pieces) // 2], pieces[len(pieces) // 2 + 1]
    stop = a[-2:] + b[:2]
    cut = text.find(stop)
    assert cut >= 0
    deltas, final = _stream(llm, prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]))
    assert final == text[:cut]
    streamed = ""
    for d in deltas:  # what a client saw was, at every step, a prefix of the final text
        streamed += d
        assert final.startswith(streamed), (streamed, final)
    assert streamed == final
    # include_stop_str_in_output streams the stop string too
    deltas, final = _stream(llm, prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop],
                                                        include_stop_str_in_output=True))
    assert final == text[:cut + len(stop)] and "".join(deltas) == final


def test_eos_stops_generation(tiny_models):
    hf, d, _ = tiny_models["llama"]
    llm = LLM(str(d), kv_cache_memory_gb=0.05)
    prompt = _prompts(1, seed=12)[0]
    full = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    eos = full.token_ids[3]
    llm.engine.tokenizer.stop_token_ids.append(eos)
    o = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0))[0]
    assert o.finish_reason == "stop" and o.token_ids[-1] == eos and len(o.token_ids) <= 4


def test_prompt_longer_than_context_is_rejected(tiny_models):
    llm = LLM(str(tiny_models["llama"][1]), kv_cache_memory_gb=0.05, max_model_len=64)
    with pytest.raises(PromptTooLongError, match="70 tokens.*fits 64"):
        llm.generate([[5] * 70], GREEDY)
    out = llm.generate([[5] * 60], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4  # stops at the context end


def test_abort_frees_blocks(llama_dir):
    llm = LLM(llama_dir, kv_cache_memory_gb=0.05)
    eng = llm.engine
    eng.add_request(_prompts(1)[0], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True), request_id="x")
    eng.step()
    eng.step()
    assert eng.block_manager.num_used_blocks > 0
    assert eng.abort("x")
    assert eng.block_manager.num_used_blocks == 0 and not eng.has_unfinished()


def test_sampling_params_validation():
    for bad in [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                dict(logprobs=50)]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_incremental_detokenizer_never_splits_multibyte(tiny_models):
    from llmopt.models.tokenizer import IncrementalDetokenizer, Tokenizer

    tok = Tokenizer(__import__("tests.conftest", fromlist=["x"]).hf_tokenizer())
    text = "héllo → 世界 🙂 ok"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode())  # byte-level: one token per byte, so characters span tokens
    d = IncrementalDetokenizer(tok, [])
    deltas = [d.add(i) for i in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in x for x in deltas)


def test_prompt_larger_than_kv_cache_is_rejected_up_front(tiny_models):
    llm = LLM(str(tiny_models["llama"][1]), num_kv_blocks=4, block_size=8)
    assert llm.engine.max_model_len == 32
    with pytest.raises(PromptTooLongError, match="40 tokens.*fits 32"):
        llm.generate([[5] * 40], GREEDY)
