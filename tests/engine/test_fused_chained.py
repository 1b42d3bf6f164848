"""Short prefill chunks (a forced ``</think>\\n<answer>``, a jump-forward tag, a short prompt tail) run in
the one-call decode step as "chained" rows: chunk row i is a decode row of its sequence over its
context up to itself, every new K/V row written before any attention reads. The result is the op-by-op
forward's, and (where the projections' sums do not depend on the row count: GGUF blocks) the same bits
as running the chunk's tokens one step at a time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch

from llmopt.config import EngineConfig, KernelSettings
from llmopt.engine import fused_decode
from llmopt.engine.engine import LLMEngine
from llmopt.engine.sampling_params import SamplingParams
from llmopt.kernels import decode_step, kv_quant
from llmopt.kernels import dense as D
from llmopt.kernels import gguf_linear as G
from llmopt.models.gguf_linear import GGUFLinear
from llmopt.models.transformer import AttnContext, PrefillSpan
from tests.conftest import chained_vs_single, gguf_blocks, requires_smollm2, save_hf_dir, tiny_hf_model, write_gguf

pytestmark = pytest.mark.skipif(decode_step._native() is None or G.kernel_table() is None
                                or D.kernel_table() is None or not kv_quant.native_available(),
                                reason="native kernels unavailable")

QT = gguf.GGMLQuantizationType
BS = 16
# (decode rows' context lengths, prefill chunks as (cached tokens, new tokens)): chunks inside a block,
# across a block boundary, from an empty cache, next to decode rows of other sequences
CASES = [([], [(9, 5)]), ([20], [(9, 5), (30, 3)]), ([7, 40], [(14, 4), (0, 6), (45, 2)])]


def _q4_1(name: str):
    return QT.Q8_0 if name == "token_embd.weight" else QT.Q4_1


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """arch -> (Q4_1 GGUF file, HF dir of packed fp32 projections): qwen2 with a qkv bias, qwen3 with
    q/k norms; 4 query heads on 2 kv heads."""
    root = tmp_path_factory.mktemp("chained")
    out = {}
    for arch in ("llama", "qwen2", "qwen3"):
        m = tiny_hf_model(arch, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=32, num_hidden_layers=2)
        out[arch] = (write_gguf(m, root / f"{arch}.gguf", qtype=_q4_1, quantizer=gguf_blocks), save_hf_dir(m, root / arch))
    return out


def _engine(path: Path, threads: int = 1, kv: str = "float32", fused: bool = True, act: str = "fp32",
            **kw) -> LLMEngine:
    cfg = EngineConfig(num_threads=threads, num_kv_blocks=96, block_size=BS, kv_dtype=kv,
                       kernels=KernelSettings(gguf_act=act, fused_decode=fused), **kw)
    return LLMEngine(str(path), cfg)


def _same(a, b) -> bool:
    (ha, ca), (hb, cb) = a, b
    return torch.equal(ha, hb) and all(torch.equal(x, y) for x, y in zip(ca, cb))


@pytest.mark.parametrize("kv", ["float32", "int8"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_chained_rows_bit_identical_to_one_at_a_time(files, arch, threads, kv):
    eng = _engine(files[arch][0], threads, kv)
    assert isinstance(eng.model.layers[0].mlp.down_proj, GGUFLinear) and eng.runner.fused is not None
    for seed, (lens, chunks) in enumerate(CASES):
        chained, forward, single = chained_vs_single(eng, BS, lens, chunks, seed)
        assert _same(chained, forward), f"case {seed}: chained step != op-by-op forward"
        assert _same(chained, single), f"case {seed}: chained step != one row at a time"


@pytest.mark.parametrize("arch, threads, kv", [("llama", 1, "float32"), ("qwen2", 2, "int8"), ("qwen3", 2, "float32")])
def test_packed_fp32_chained_rows_equal_forward(files, arch, threads, kv):
    """Packed fp32 projections: the op-by-op forward's bits. One row at a time differs in the last
    bits only: the packed GEMM's register tiles of 1-3 rows sum K in interleaved parts (sgemm.cpp), so
    its sums depend on the row count in any batch, fused or not."""
    eng = _engine(files[arch][1], threads, kv)
    assert isinstance(eng.model.layers[0].mlp.down_proj, D.PackedLinear) and eng.runner.fused is not None
    for seed, (lens, chunks) in enumerate(CASES):
        chained, forward, single = chained_vs_single(eng, BS, lens, chunks, seed)
        assert _same(chained, forward), f"case {seed}: chained step != op-by-op forward"
        torch.testing.assert_close(chained[0], single[0], rtol=1e-4, atol=1e-4)


def test_avx2_path_in_a_fresh_process(files):
    """LLMOPT_CPU_PATH=avx2 (every machine's floor) in a fresh process: the GGUF kernels' AVX2 build,
    chained rows still the bits of one row at a time, fp32 and int8 caches."""
    if "avx2" not in G.available_paths():
        pytest.skip("no AVX2 build")
    code = ("from llmopt.config import EngineConfig\nfrom llmopt.engine.engine import LLMEngine\n"
            "from llmopt.kernels import gguf_linear as G\nfrom tests.conftest import chained_vs_single\n"
            "res = []\n"
            "for kv in ('float32', 'int8'):\n"
            f"    eng = LLMEngine({str(files['qwen3'][0])!r}, EngineConfig(num_threads=2, num_kv_blocks=96,"
            f" block_size={BS}, kv_dtype=kv))\n"
            f"    for seed, (lens, chunks) in enumerate({CASES!r}):\n"
            f"        (a, ca), _, (b, cb) = chained_vs_single(eng, {BS}, lens, chunks, seed)\n"
            "        res.append(bool((a == b).all()) and all(bool((x == y).all()) for x, y in zip(ca, cb)))\n"
            "print('RESULT', G.cpu_path(), all(res), len(res))\n")
    r = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "LLMOPT_CPU_PATH": "avx2"},
                       capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")]
    assert r.returncode == 0 and line, r.stderr[-2000:]
    assert line[0] == f"RESULT avx2 True {2 * len(CASES)}"


def test_steps_it_does_not_chain_fall_back_with_a_reason(files, monkeypatch):
    """More rows than the chained-row limit, or a SnapKV observation window in a chunk: op by op
    (run -> None), counted under "the step has prefill tokens"."""
    eng = _engine(files["llama"][0])
    fused = eng.runner.fused
    t = torch.arange(4, dtype=torch.int32)
    ctx = AttnContext(slot_mapping=torch.arange(10, 16), prefills=[PrefillSpan(0, 6, 16, t)],
                      generated=torch.ones(6, dtype=torch.bool))
    ids, pos = torch.arange(6), torch.arange(10, 16)
    monkeypatch.setattr(fused, "chain_rows", 5)
    with torch.inference_mode():
        assert fused.run(ids, pos, ctx) is None
        monkeypatch.setattr(fused, "chain_rows", fused_decode.CHAIN_ROWS)
        ctx.prefills[0].observe = 2
        assert fused.run(ids, pos, ctx) is None
        ctx.prefills[0].observe = 0
        assert fused.run(ids, pos, ctx) is not None
    assert fused.fallbacks == {"the step has prefill tokens (more than 5 rows)": 1,
                               "the step has prefill tokens (a SnapKV observation window)": 1}
    assert fused.steps == 1


OPEN_PROMPT = "Question: what is two and two?\n<think>"


@pytest.mark.parametrize("model, kv, act", [("gguf", "float32", "by-kind"), ("gguf", "int8", "fp32"),
                                            ("packed", "float32", "fp32")])
def test_think_budget_tokens_same_with_the_step_on_and_off(files, model, kv, act):
    """The forced closing text (a chunk of several tokens) runs in the step: no "prefill tokens"
    fallback once the prompts are in; the tokens equal the op-by-op engine's, batched and alone."""
    path = files["llama"][0 if model == "gguf" else 1]
    sp = [SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, think_budget=b) for b in (4, 7, 11)]
    prompts = [OPEN_PROMPT, OPEN_PROMPT + " Let me see.", "Two and two?\n<think>"]
    on = _engine(path, 2, kv, act=act)
    fused = on.runner.fused
    assert fused is not None
    on.generate(prompts[:1], sp[:1])  # the prompts' prefill chunks are long: let them fall back first
    before_steps, before = fused.steps, dict(fused.fallbacks)
    batched = [o.token_ids for o in on.generate(prompts, sp)]
    assert sum(o.reasoning.closed_by == "budget" for o in on.generate(prompts, sp)) >= 2
    new_fallbacks = {k: v - before.get(k, 0) for k, v in fused.fallbacks.items() if v != before.get(k, 0)}
    # what still falls back: only the prompts (longer than the chained-row limit or, by kind, prompt rows)
    assert set(new_fallbacks) <= {f"the step has prefill tokens (more than {fused.chain_rows} rows)",
                                  "the step has prompt-token rows (by-kind GGUF activations)"}
    assert sum(new_fallbacks.values()) <= 2 * len(prompts)
    assert fused.steps - before_steps >= 2 * 25
    single = [on.generate([p], s)[0].token_ids for p, s in zip(prompts, sp)]
    off = _engine(path, 2, kv, fused=False, act=act)
    assert off.runner.fused is None
    plain = [o.token_ids for o in off.generate(prompts, sp)]
    assert batched == single == plain


@requires_smollm2
def test_jump_forward_on_the_default_model_runs_in_the_step():
    """The reasoning model (by-kind activations by default): jump-forward's tag tails are generated-token
    chunks; with the step on they run in it and the greedy tokens equal the op-by-op engine's."""
    from llmopt import LLM
    from llmopt.models.registry import REASONING_MODEL
    from llmopt.tasks.base import REASONING_SYSTEM_PROMPT

    convs = [[{"role": "system", "content": REASONING_SYSTEM_PROMPT}, {"role": "user", "content": "What is 17 * 24?"}],
             [{"role": "system", "content": REASONING_SYSTEM_PROMPT},
              {"role": "user", "content": "Is 91 a prime number? Answer yes or no."}]]
    sp = SamplingParams(max_tokens=120, temperature=0.0, stop=["</answer>"], include_stop_str_in_output=True,
                        jump_forward=True)
    out = {}
    for flag in (True, False):
        llm = LLM(REASONING_MODEL, kv_cache_memory_gb=0.1, num_threads=1, kernels=KernelSettings(fused_decode=flag))
        eng = llm.engine
        jumps = eng.stats["jump_forward_tokens"]
        out[flag] = [o.token_ids for o in llm.chat(convs, sp)]
        assert eng.stats["jump_forward_tokens"] > jumps
        if flag:
            fused = eng.runner.fused
            assert fused is not None and fused.steps > 0
            assert not any(k.startswith("the step has prefill tokens (a") for k in fused.fallbacks)
            assert fused.fallbacks.get("the step has prefill tokens (more than 32 rows)", 0) <= len(convs)
    assert out[True] == out[False]
