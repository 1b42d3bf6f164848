"""H2O (engine/kv_policy.py): decode-time eviction by accumulated attention mass. Blocks really
freed, the cache held within [budget, budget + block_size), batch invariance in any policy mix,
the accumulated mass against transformers' own attention weights, the kept rows against the
method written out, float and 8-bit caches, and clear errors for bad budgets."""

import math

import pytest
import torch

from llmopt import LLM, SamplingParams
from llmopt.config import EngineConfig
from llmopt.engine.kv_policy import h2o_initial_scores, h2o_keep, observation_scores
from tests.conftest import random_prompts

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
BS = 8
KW = dict(kv_cache_memory_gb=0.05, block_size=BS, kv_sinks=4, kv_window=8)


def _prompts(n=6, seed=0, lo=20, hi=120):
    return random_prompts(n, seed, lo, hi)


@pytest.mark.parametrize("kv_dtype", [None, "int8", "fp8"])
@pytest.mark.parametrize("prompt_len,budget", [(100, 30), (20, 30), (100, 0.25)])
def test_h2o_frees_blocks_and_keeps_the_cache_within_a_block_of_the_budget(llama_dir, kv_dtype, prompt_len, budget):
    llm = LLM(llama_dir, kv_policy="h2o", kv_budget=budget, kv_dtype=kv_dtype, **KW)
    eng = llm.engine
    seq = eng.add_request(list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=40, temperature=0.0,
                                                                          ignore_eos=True))
    rows = budget if isinstance(budget, int) else math.ceil(budget * prompt_len)
    evictions, G = 0, 2  # tiny llama: 4 query heads on 2 kv heads
    prev = None
    while not seq.finished:
        before = seq.num_evicted
        eng.step()
        if seq.finished:
            break
        evictions += seq.num_evicted > before
        assert seq.num_evicted + seq.kv_len == seq.num_computed_tokens  # true positions, nothing lost
        assert len(seq.block_table) == math.ceil(seq.kv_len / BS)  # evicted rows' blocks were freed
        assert eng.block_manager.num_used_blocks == len(seq.block_table)
        if seq.num_computed_tokens >= rows + BS or seq.num_evicted:
            assert rows <= seq.kv_len < rows + BS
        else:
            assert seq.kv_len == seq.num_computed_tokens
        acc = seq.kv_scores
        assert acc is not None and acc.shape[:2] == (2, 2) and not acc[..., seq.kv_len:].any()
        mass = acc[..., :seq.kv_len].sum(-1)
        if prev is not None and seq.num_evicted == before:  # one decode query: G probabilities summing to 1
            torch.testing.assert_close(mass - prev, torch.full_like(mass, float(G)), rtol=0, atol=1e-4)
        prev = mass
    assert evictions >= (3 if prompt_len > rows else 1)
    assert eng.block_manager.num_used_blocks == 0
    assert seq.kv_rows_at_finish is not None and seq.kv_rows_at_finish < rows + BS


MIX = [("h2o", 30), ("full", None), ("h2o", 0.3), ("streaming", 24), ("snapkv", 0.3), ("h2o", 40)]


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_h2o_sequences_batched_with_any_policy_mix_match_each_alone(llama_dir, kv_dtype):
    prompts = _prompts()
    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, kv_policy=p, kv_budget=b)
              for p, b in MIX]
    alone = LLM(llama_dir, max_num_seqs=1, kv_dtype=kv_dtype, **KW)
    singles = [alone.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    # a small token budget chunks the prefills differently from the runs alone; decode steps mix the
    # h2o rows (op by op) with the others (the fused step when alone)
    batched = LLM(llama_dir, kv_dtype=kv_dtype, max_num_batched_tokens=50, **KW)
    outs = batched.generate(prompts, params)
    assert [o.token_ids for o in outs] == singles
    assert batched.engine.block_manager.num_used_blocks == 0
    # the engine-wide policy gives the same tokens as the per-request override
    eng_h2o = LLM(llama_dir, kv_policy="h2o", kv_budget=30, kv_dtype=kv_dtype, **KW)
    assert eng_h2o.generate([prompts[0]], GREEDY)[0].token_ids == singles[0]


def test_h2o_evicts_and_changes_the_output_of_a_long_generation(llama_dir):
    p = _prompts(1, seed=4, lo=100, hi=101)[0]
    full = LLM(llama_dir, **KW).generate([p], GREEDY)[0]
    h2o = LLM(llama_dir, kv_policy="h2o", kv_budget=20, **KW).generate([p], GREEDY)[0]
    assert h2o.kv_tokens is not None and full.kv_tokens is not None
    assert 20 <= h2o.kv_tokens < 20 + BS < full.kv_tokens


@pytest.mark.parametrize("pool", [1, 5])
def test_h2o_mass_is_the_sum_of_transformers_attention_weights(tiny_models, pool):
    """No eviction (a budget above the whole run): the accumulated mass equals, per layer and kv head,
    the prefill's last-window attention (max-pooled before the window) plus every decode query's
    attention, all taken from transformers' eager attention weights over the final sequence."""
    hf, d, _ = tiny_models["llama"]
    hf.config._attn_implementation = "eager"
    ids = _prompts(1, seed=3, lo=60, hi=61)[0]
    W = KW["kv_window"]
    llm = LLM(str(d), kv_policy="h2o", kv_budget=1000, kv_pool=pool, **KW)
    eng = llm.engine
    seq = eng.add_request(ids, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    acc = None
    while not seq.finished:
        eng.step()
        if not seq.finished:
            acc = seq.kv_scores[..., :seq.kv_len].clone()  # type: ignore[index]
    assert acc is not None
    C, P = acc.shape[-1], len(ids)  # the cache after the last unfinished step: C - P decode queries
    assert C >= P + 8
    full = (ids + seq.output_ids)[:C]
    with torch.no_grad():
        att = hf(torch.tensor([full]), output_attentions=True).attentions  # [1, Hq, C, C] per layer
    Hq, Hk = hf.config.num_attention_heads, hf.config.num_key_value_heads
    for layer, a in enumerate(att):
        a = a[0].reshape(Hk, Hq // Hk, C, C).sum(1).float()  # [Hk, C(query), C(key)]
        obs = a[:, P - W:P, :P].sum(1)
        r = pool // 2
        start = torch.stack([obs[:, max(0, j - r):min(P - W, j + r + 1)].amax(1) for j in range(P - W)], 1)
        ref = torch.zeros(Hk, C)
        ref[:, :P - W] = start
        ref[:, P - W:P] = obs[:, P - W:]
        ref += a[:, P:, :].sum(1)
        torch.testing.assert_close(acc[layer], ref, rtol=1e-4, atol=1e-4)


def test_h2o_keeps_sinks_window_and_the_heaviest_rows_and_moves_their_mass(llama_dir):
    """Each eviction keeps, per layer and kv head, the sinks, the recent window and the rows of the
    largest accumulated mass (checked against the rule written out), moves the cache rows with them
    and carries their mass along."""
    llm = LLM(llama_dir, kv_policy="h2o", kv_budget=24, **KW)
    eng = llm.engine
    comp = eng.compressor
    seen: list[dict] = []
    orig = comp._keep_rows

    def spy(seq, rows):
        k, table = comp.caches[0], list(seq.block_table)
        moved = {(layer, h, r): k[layer, table[src // BS], src % BS, h].clone()
                 for layer in range(rows.shape[0]) for h in range(rows.shape[1])
                 for r, src in enumerate(rows[layer, h].tolist())}
        rec = {"rows": rows.clone(), "scores": seq.kv_scores[..., :seq.kv_len].clone()}
        orig(seq, rows)
        after = list(seq.block_table)
        # the cache now holds the kept rows, in order, for every layer and head
        for (layer, h, r), v in moved.items():
            assert torch.equal(k[layer, after[r // BS], r % BS, h], v)
        seen.append(rec)

    comp._keep_rows = spy  # type: ignore[method-assign]
    seq = eng.add_request(_prompts(1, seed=2, lo=90, hi=91)[0], SamplingParams(max_tokens=30, temperature=0.0,
                                                                                 ignore_eos=True))
    mass_after = []
    while not seq.finished:
        n = len(seen)
        eng.step()
        if len(seen) > n and not seq.finished:
            mass_after.append(seq.kv_scores[..., :seq.kv_len].clone())  # type: ignore[index]
    assert len(seen) >= 3
    sinks, W, keep = 4, 8, 24
    for rec, after in zip(seen, mass_after):
        rows, scores = rec["rows"], rec["scores"]
        L, Hk, C = scores.shape
        assert rows.shape == (L, Hk, keep)
        for layer in range(L):
            for h in range(Hk):
                kept = rows[layer, h].tolist()
                assert kept[:sinks] == list(range(sinks)) and kept[-W:] == list(range(C - W, C))
                assert kept == sorted(set(kept))
                mid = scores[layer, h, sinks:C - W]
                chosen = torch.zeros(C - sinks - W, dtype=torch.bool)
                chosen[[k - sinks for k in kept[sinks:-W]]] = True
                assert mid[chosen].min() >= mid[~chosen].max()
        # the mass after the step = the kept rows' mass (the step's own query was added before the eviction)
        torch.testing.assert_close(after, scores.gather(-1, rows))


def test_h2o_keep_rule():
    s = torch.zeros(1, 20)
    s[0, 6], s[0, 9], s[0, 2], s[0, 17] = 3.0, 2.0, 9.0, 0.5
    rows = h2o_keep(s, keep=2 + 2 + 4, sinks=2, window=4)
    assert rows[0].tolist() == [0, 1, 2, 6, 16, 17, 18, 19]  # the two heaviest between sinks and window
    # no sinks: the fourth heavy hitter is a tie among zeros, which goes to the earliest row
    assert h2o_keep(s, keep=4 + 4, sinks=0, window=4)[0].tolist() == [0, 2, 6, 9, 16, 17, 18, 19]
    with pytest.raises(ValueError, match="cannot keep"):
        h2o_keep(s, keep=5, sinks=2, window=4)
    q, k = torch.randn(1, 4, 8), torch.randn(20, 2, 8)
    torch.testing.assert_close(observation_scores(q, k, 0.3).sum(1), torch.full((2,), 2.0))
    init = h2o_initial_scores(torch.arange(10.0)[None], window=3, pool=3)
    assert init[0].tolist() == [1, 2, 3, 4, 5, 6, 6, 7, 8, 9]  # pooled among the 7 rows before the window


def test_h2o_bad_budgets_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="kv_sinks \\+ kv_window"):
        EngineConfig(kv_policy="h2o", kv_budget=36)  # 4 sinks + 32 window: no room for a heavy hitter
    EngineConfig(kv_policy="h2o", kv_budget=37)
    with pytest.raises(ValueError, match="needs kv_budget"):
        EngineConfig(kv_policy="h2o")
    with pytest.raises(ValueError, match="h2o needs kv_window"):
        EngineConfig(kv_policy="h2o", kv_budget=0.5, max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="needs kv_budget"):
        SamplingParams(kv_policy="h2o")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        SamplingParams(kv_policy="h2o", kv_budget=2.0)
    with pytest.raises(ValueError, match="kv_sinks \\+ kv_window"):  # a request's pair, checked on arrival
        EngineConfig(kv_sinks=4, kv_window=8, block_size=8).kv_policy_for("h2o", 12)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.int8, torch.float8_e4m3fn])
def test_attention_mass_native_matches_the_torch_reference_and_is_batch_invariant(kv_dtype):
    """kernels.kv_select.attention_mass (csrc attention_mass / attention_mass_int8) against the torch
    reference (gathered keys, softmax), rows of very different lengths (one tile, partial tiles, long),
    GQA with 3 query heads per kv head, head_dim not a multiple of 8 on one case; each row alone gives
    the bits it gets in the batch."""
    from llmopt.kernels import kv_quant, ops
    from llmopt.kernels.kv_select import attention_mass, attention_mass_ref

    if ops._native() is None or (kv_dtype != torch.float32 and not kv_quant.native_available()):
        pytest.skip("native kernels unavailable")
    g = torch.Generator().manual_seed(0)
    for D, lens in ((64, [1, 7, 32, 33, 300, 95]), (20, [5, 40, 3])):
        NB, bs, Hk, Hq = 64, 16, 2, 6
        k = torch.randn(NB, bs, Hk, D, generator=g) * 2
        scale = torch.ones(NB, bs, Hk)
        if kv_dtype != torch.float32:
            k, scale = kv_quant.quantize_kv(k, kv_dtype)
        ks = None if kv_dtype == torch.float32 else scale
        B = len(lens)
        q = torch.randn(B, Hq, D, generator=g)
        tables = torch.stack([torch.randperm(NB, generator=g)[:32] for _ in range(B)]).to(torch.int32)
        cl = torch.tensor(lens, dtype=torch.int32)
        got = attention_mass(q, k, ks, tables, cl, D ** -0.5)
        ref = attention_mass_ref(q, k, ks, tables, cl, D ** -0.5)
        assert got.shape == (B, Hk, max(lens))
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.sum(-1), torch.full((B, Hk), Hq / Hk), rtol=1e-5, atol=1e-5)
        for b in range(B):
            alone = attention_mass(q[b:b + 1], k, ks, tables[b:b + 1], cl[b:b + 1], D ** -0.5)
            assert torch.equal(alone[0], got[b, :, :lens[b]])
            assert not got[b, :, lens[b]:].any()


def test_h2o_a_chunk_of_several_tokens_after_the_prefill_adds_every_rows_mass(llama_dir):
    """Text the engine appends in one go after the prefill (jump-forward, a forced think close) is a
    prefill chunk of a compressed sequence: each of its rows adds its own probabilities (each row
    over the context it attended), so the mass grows by rows x group size."""
    llm = LLM(llama_dir, kv_policy="h2o", kv_budget=30, **KW)
    eng = llm.engine
    seq = eng.add_request(_prompts(1, seed=6, lo=60, hi=61)[0], SamplingParams(max_tokens=20, temperature=0.0,
                                                                               ignore_eos=True))
    eng.step()
    assert seq.kv_compressed and seq.kv_len == 30 and len(seq.output_ids) == 1
    before = seq.kv_scores[..., :seq.kv_len].sum(-1)  # type: ignore[index]
    seq.output_ids.extend([5, 6, 7])  # as the engine's jump-forward appends a tag's tokens
    eng.step()
    assert seq.num_evicted == 60 - 30 and seq.kv_len == 34
    after = seq.kv_scores[..., :seq.kv_len].sum(-1)  # type: ignore[index]
    torch.testing.assert_close(after - before, torch.full_like(before, 4 * 2.0), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kv_dtype", [None, "int8", "fp8"])
def test_h2o_fused_step_fills_the_same_mass_as_the_op_by_op_forward(llama_dir, kv_dtype):
    """The one-call decode step (csrc/decode.cpp) computes the h2o rows' mass itself: the same bits as
    the op-by-op forward's attention_mass at every step (decode rows and a forced multi-token chunk),
    hence the same evictions and tokens; a batch with other policies' rows stays on the step."""
    from llmopt.config import KernelSettings
    from llmopt.kernels import decode_step

    if decode_step.native() is None:
        pytest.skip("native kernels unavailable")
    prompts = _prompts(3, seed=7, lo=50, hi=110)
    runs = {}
    for fused in (True, False):
        llm = LLM(llama_dir, kv_dtype=kv_dtype, kernels=KernelSettings(fused_decode=fused), **KW)
        eng = llm.engine
        seqs = [eng.add_request(p, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                                  kv_policy=pol, kv_budget=b))
                for p, (pol, b) in zip(prompts, [("h2o", 30), ("full", None), ("h2o", 0.3)])]
        trace = []
        while eng.has_unfinished():
            eng.step()
            if seqs[0].kv_compressed and len(seqs[0].output_ids) == 5:  # a forced chunk, as jump-forward
                seqs[0].output_ids.extend(list(range(9, 21)))  # 13 rows: torch orders sums of 5+ rows by layout
            trace.append([None if s.kv_scores is None or s.finished else s.kv_scores[..., :s.kv_len].clone()
                          for s in (seqs[0], seqs[2])])
        runs[fused] = ([s.output_ids for s in seqs], trace, eng.runner.fused)
    assert runs[True][0] == runs[False][0]
    for a, b in zip(runs[True][1], runs[False][1], strict=True):
        for x, y in zip(a, b):
            assert (x is None and y is None) or torch.equal(x, y)
    fused = runs[True][2]
    assert fused is not None and fused.steps >= 25 and runs[False][2] is None
    assert set(fused.fallbacks) == {"the step has prefill tokens (more than 32 rows)"}  # the prompts only
