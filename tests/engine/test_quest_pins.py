"""Quest with pinned blocks (``kv_quest_pin``, kernels/quest.py ``quest_pins``): at the end of the
prefill each (layer, kv head) pins the blocks the prompt's observation window voted for (SnapKV's
scores, checked against transformers' own attention weights), and every later decode step reads
them inside the same block budget. Pin 0 is plain Quest bit for bit; the fused step equals the
op-by-op forward with pins (float32, int8, fp8); batched equals alone; the prefix cache still
serves pinned requests, less the observation window; pins go with the sequence."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from llmopt import LLM, SamplingParams
from llmopt.config import EngineConfig, KernelSettings, KVPolicy
from llmopt.engine.engine import LLMEngine
from llmopt.kernels import decode_step, kv_quant, quest
from llmopt.kernels import dense as D
from tests.conftest import decode_batch, random_prompts, save_hf_dir, tiny_hf_model

W = 8
KW = dict(kv_cache_memory_gb=0.05, block_size=8, kv_quest_dense_layers=0, kv_window=W, kv_pool=5)
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)

native = pytest.mark.skipif(decode_step._native() is None or D.kernel_table() is None
                            or not kv_quant.native_available() or not quest.native_available(),
                            reason="native kernels unavailable")


def _sp(pin: float | None, budget=0.25, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0, kv_policy="quest",
                          kv_budget=budget, kv_quest_pin=pin, **kw)


def _prompts(n=4, seed=0, lo=150, hi=260):
    return random_prompts(n, seed, lo, hi)


def _pins_after_prefill(eng, ids, sp) -> tuple[torch.Tensor | None, object]:
    seq = eng.add_request(ids, sp)
    while not seq.output_ids:
        eng.step()
    pins = None if seq.quest_pins is None else seq.quest_pins.clone()
    while not seq.finished:
        eng.step()
    return pins, seq


def test_pins_are_the_blocks_hf_attention_votes_for(tiny_models):
    """The engine's pins are, per layer and kv head, the ``floor(pin * k)`` blocks whose best
    max-pooled prefix row has the highest vote, the votes summed from transformers' own eager
    attention weights of the last W queries over the group's query heads."""
    hf, d, _ = tiny_models["llama"]
    hf.config._attn_implementation = "eager"
    ids = _prompts(1, seed=3, lo=200, hi=201)[0]
    C, bs, pool, budget, pin = len(ids), KW["block_size"], KW["kv_pool"], 0.25, 0.5
    with torch.no_grad():
        att = hf(torch.tensor([ids]), output_attentions=True).attentions
    llm = LLM(str(d), kv_policy="quest", kv_budget=budget, **KW)
    pins, _ = _pins_after_prefill(llm.engine, ids, _sp(pin, budget))
    k = math.ceil(math.ceil(budget * (C + 1)) / bs)
    n_pin = math.floor(pin * k)
    Hq, Hk = hf.config.num_attention_heads, hf.config.num_key_value_heads
    nb = (C + bs - 1) // bs
    assert pins is not None and pins.shape == (len(att), Hk, nb) and n_pin >= 2
    prefix = C - W
    for layer, a in enumerate(att):
        votes = a[0, :, -W:, :].reshape(Hk, Hq // Hk, W, C).sum((1, 2)).float()[:, :prefix]
        r = pool // 2
        pooled = torch.stack([votes[:, max(0, j - r):min(prefix, j + r + 1)].amax(1) for j in range(prefix)], 1)
        block = torch.full((Hk, nb), float("-inf"))
        for j in range(1, nb):
            if j * bs < prefix:
                block[:, j] = pooled[:, j * bs:min(prefix, (j + 1) * bs)].amax(1)
        for h in range(Hk):
            chosen = pins[layer, h].bool()
            assert int(chosen.sum()) == n_pin and not bool(chosen[0])
            others = block[h][~chosen]
            assert block[h][chosen].min() >= others.max() - 1e-5  # a top-n of the reference votes


def test_pin_zero_is_plain_quest_and_pins_change_the_output(llama_dir):
    llm = LLM(llama_dir, kv_policy="quest", kv_budget=0.25, **KW)
    plain = llm.generate(_prompts(), _sp(None))  # the engine's kv_quest_pin: 0
    zero = llm.generate(_prompts(), _sp(0.0))
    assert [o.logprobs for o in zero] == [o.logprobs for o in plain]
    pinned = llm.generate(_prompts(), _sp(0.75))
    assert [o.logprobs for o in pinned] != [o.logprobs for o in plain]
    # the engine-wide setting equals the per-request one
    eng_wide = LLM(llama_dir, kv_policy="quest", kv_budget=0.25, kv_quest_pin=0.75, **KW)
    assert [o.logprobs for o in eng_wide.generate(_prompts(), _sp(None))] == [o.logprobs for o in pinned]


def test_pinned_batch_matches_each_sequence_alone_and_the_prefix_cache_serves_it(llama_dir):
    alone = LLM(llama_dir, max_num_seqs=1, kv_policy="quest", kv_budget=0.25, enable_prefix_caching=False, **KW)
    singles = [_pins_after_prefill(alone.engine, p, _sp(0.5)) for p in _prompts()]
    batched = LLM(llama_dir, kv_policy="quest", kv_budget=0.25, max_num_batched_tokens=50,
                  enable_prefix_caching=False, **KW)
    outs = batched.generate(_prompts(), _sp(0.5))
    assert [o.token_ids for o in outs] == [list(s.output_ids) for _, s in singles]
    # the prefix cache (filled by full requests on the same prompts) serves all but the window's blocks,
    # and the pins and tokens are the same
    cached = LLM(llama_dir, kv_policy="quest", kv_budget=0.25, max_num_seqs=1, **KW)
    cached.generate(_prompts(), SamplingParams(max_tokens=1, temperature=0.0, kv_policy="full"))
    for p, (pins, seq) in zip(_prompts(), singles):
        before = cached.engine.stats["computed_prefill_tokens"]
        got, s2 = _pins_after_prefill(cached.engine, p, _sp(0.5))
        computed = cached.engine.stats["computed_prefill_tokens"] - before
        assert W <= computed < W + 2 * KW["block_size"]
        assert pins is not None and got is not None and torch.equal(got, pins)
        assert list(s2.output_ids) == list(seq.output_ids)


def test_pins_go_with_the_sequence_not_with_the_blocks(llama_dir):
    """A freed sequence drops its pins; blocks a pinned request computed and another request reuses
    (through the prefix cache, or after they were freed) are not pinned for that request: a plain
    Quest request reading them, after or next to a pinned one, equals plain Quest on a fresh engine."""
    prompts = _prompts(3, seed=4)
    fresh = LLM(llama_dir, kv_policy="quest", kv_budget=0.25, **KW).generate(prompts, _sp(0.0))
    llm = LLM(llama_dir, kv_policy="quest", kv_budget=0.25, **KW)
    pins, seq = _pins_after_prefill(llm.engine, prompts[0], _sp(0.5))
    assert pins is not None and int(pins.sum()) > 0 and seq.quest_pins is None and not seq.kv_compressed
    after = llm.generate(prompts, _sp(0.0))  # prompts[0]'s blocks come from the pinned request
    assert [o.logprobs for o in after] == [o.logprobs for o in fresh]
    mixed = llm.generate([prompts[1], prompts[1], prompts[2]], [_sp(0.5), _sp(0.0), _sp(0.5)])
    assert mixed[1].logprobs == fresh[1].logprobs and mixed[0].token_ids != fresh[1].token_ids


def test_bad_pin_settings_are_refused_with_a_reason(llama_dir):
    with pytest.raises(ValueError, match="kv_quest_pin"):
        EngineConfig(kv_policy="quest", kv_budget=0.25, kv_quest_pin=1.5)
    with pytest.raises(ValueError, match="kv_quest_pin"):
        SamplingParams(kv_policy="quest", kv_budget=0.25, kv_quest_pin=-0.1)
    with pytest.raises(ValueError, match="applies to kv_policy 'quest'"):
        KVPolicy("snapkv", 0.25, pin=0.5)
    with pytest.raises(ValueError, match="needs kv_policy='quest'"):  # an engine-wide pin without Quest
        EngineConfig(kv_policy="snapkv", kv_budget=0.25, kv_quest_pin=0.25)
    with pytest.raises(ValueError, match="kv_window"):
        EngineConfig(kv_policy="quest", kv_budget=0.25, kv_quest_pin=0.5, kv_window=64, max_num_batched_tokens=32)
    # a pin on a request of another policy is ignored by that policy (it only applies to quest)
    cfg = EngineConfig(kv_policy="quest", kv_budget=0.25, kv_quest_pin=0.5)
    p = cfg.kv_policy_for("snapkv", 0.25)
    assert p is not None and p.pin == 0.0


# ---- the fused one-call decode step with pins (csrc/decode.cpp) ----------------------------------------

BS = 16
LENS = {1: [300], 3: [7, 330, 129], 4: [5, 200, 17, 640]}
TOPK = [3, 0, 2, 5, 1]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("qpin")
    return save_hf_dir(tiny_hf_model("qwen3", hidden_size=72, intermediate_size=100, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=18, num_hidden_layers=2), root / "qwen3")


def _engine(path: Path, fused: bool = True, kv_dtype: str = "float32", **kw) -> LLMEngine:
    cfg = EngineConfig(num_threads=2, num_kv_blocks=400, block_size=BS, kv_dtype=kv_dtype,
                       kernels=KernelSettings(fused_decode=fused), **kw)
    return LLMEngine(str(path), cfg)


@native
@pytest.mark.parametrize("kv_dtype", ["float32", "int8", "fp8"])
def test_fused_step_with_pins_equals_the_op_by_op_forward(hf_dir, kv_dtype):
    eng = _engine(hf_dir, kv_dtype=kv_dtype, kv_policy="quest", kv_budget=0.25, kv_quest_dense_layers=1)
    r = eng.runner
    fused = r.fused
    assert fused is not None
    n_layers, hk = eng.model.cfg.num_layers, eng.model.cfg.num_kv_heads
    for rows, lens in LENS.items():
        g = torch.Generator().manual_seed(rows)
        init = [torch.randint(-127, 128, t.shape, generator=g, dtype=torch.int8) if t.dtype == torch.int8
                else torch.randint(0, 0x7F, t.shape, generator=g, dtype=torch.uint8).view(kv_quant.FP8)
                if t.dtype == kv_quant.FP8
                else torch.rand(t.shape, generator=g) * 0.05 if i >= 2 else torch.randn(t.shape, generator=g)
                for i, t in enumerate(r.cache_tensors)]
        k = init[0].float() if r.k_scale is None else kv_quant.dequantize_kv(init[0], init[2])
        summaries = [k.amin(2), k.amax(2)]
        ids, pos, ctx = decode_batch(lens, BS, rows)
        ctx.decode_topk = torch.tensor([TOPK[i % len(TOPK)] for i in range(len(lens))], dtype=torch.int32)
        ctx.quest_dense_layers = 1
        width = ctx.decode_block_tables.shape[1]
        ctx.decode_pins = (torch.rand(len(lens), n_layers, hk, width, generator=g) < 0.1).to(torch.uint8)
        out = []
        with torch.inference_mode():
            for pins in (ctx.decode_pins, None):
                ctx.decode_pins = pins
                for use_fused in (True, False):
                    for t, t0 in zip(r.cache_tensors + [r.k_min, r.k_max], init + summaries):
                        t.copy_(t0)
                    out.append(fused.run(ids, pos, ctx) if use_fused else r.model(ids, pos, ctx))
        pinned_f, pinned_o, plain_f, plain_o = out
        assert pinned_f is not None and torch.equal(pinned_f, pinned_o), f"rows {rows}"
        assert torch.equal(plain_f, plain_o)
        if rows == 4:  # 640 tokens, 40 blocks, 5 read: the pins change the result
            assert not torch.equal(pinned_f[3], plain_f[3])


@native
@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_greedy_pinned_quest_fused_on_and_off(hf_dir, kv_dtype):
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (260, 40, 190, 333)]
    sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, kv_policy="quest", kv_budget=48,
                        kv_quest_pin=0.5)
    kw = dict(kv_policy="quest", kv_budget=48, kv_quest_dense_layers=0)
    on = _engine(hf_dir, kv_dtype=kv_dtype, **kw)
    fused = on.runner.fused
    assert fused is not None
    batched = on.generate(prompts, sp)
    single = [on.generate([p], sp)[0] for p in prompts]
    assert fused.steps > 0
    off = _engine(hf_dir, fused=False, kv_dtype=kv_dtype, **kw)
    assert off.runner.fused is None
    plain = off.generate(prompts, sp)
    assert [o.token_ids for o in batched] == [o.token_ids for o in single] == [o.token_ids for o in plain]
