"""The one-call decode step (csrc/decode.cpp) over an int8 KV cache (``kv_dtype="int8"``) against the
op-by-op int8-KV forward of the same model: the step quantizes the new token's K/V with the same
rounding and scale (the same cache bytes and scales) and reads the cache with the native int8
attention's tile loop (csrc/kv_int8.h), so the same hidden states bit for bit and the same greedy
tokens, with and without KV compression policies."""

from __future__ import annotations

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
from llmopt.kernels.dense import PackedLinear
from llmopt.models.gguf_linear import GGUFLinear
from tests.conftest import (
    avx2_greedy_fused_on_and_off,
    fused_and_forward,
    gguf_blocks,
    save_hf_dir,
    tiny_hf_model,
    write_gguf,
)

pytestmark = pytest.mark.skipif(decode_step._native() is None or D.kernel_table() is None
                                or not kv_quant.native_available(), reason="native kernels unavailable")

BS = 16
# rows 1-8; contexts within a block, across blocks, and one long one (several 32-token tiles, a
# partial last tile); the 2-row batch pairs a 1-token context with a 700-token one
LENS = {1: [40], 2: [1, 700], 3: [7, 33, 1], 4: [5, 20, 17, 64], 5: [5, 20, 17, 64, 2],
        8: [3, 9, 50, 16, 2, 70, 31, 97]}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """arch -> HF dir (packed fp32 projections): qwen2 with a qkv bias, qwen3 with q/k norms; 4 query
    heads on 2 kv heads (GQA groups of 2), head_dim 18 (the row kernels' scalar tails)."""
    root = tmp_path_factory.mktemp("kv8")
    out = {}
    for arch in ("llama", "qwen2", "qwen3"):
        m = tiny_hf_model(arch, hidden_size=72, intermediate_size=100, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=18, num_hidden_layers=2)
        out[arch] = save_hf_dir(m, root / arch)
    return out


@pytest.fixture(scope="module")
def q4_1_file(tmp_path_factory):
    """The default model's types on a tiny llama: Q4_1 layers, Q8_0 tied head; head_dim 64."""
    m = tiny_hf_model("llama", hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=64, num_hidden_layers=2)
    qt = gguf.GGMLQuantizationType

    def qtype(name: str):
        return qt.Q8_0 if name == "token_embd.weight" else qt.Q4_1

    return write_gguf(m, tmp_path_factory.mktemp("kv8gguf") / "q4_1.gguf", qtype=qtype, quantizer=gguf_blocks)


def _engine(path: Path, threads: int = 1, fused: bool = True, kv_dtype: str = "int8", **kw) -> LLMEngine:
    cfg = EngineConfig(num_threads=threads, num_kv_blocks=160, block_size=BS, kv_dtype=kv_dtype,
                       kernels=KernelSettings(fused_decode=fused), **kw)
    return LLMEngine(str(path), cfg)


def _assert_step_equals_forward(eng: LLMEngine, lens: list[int], seed: int = 0) -> None:
    """Hidden states, and the 8-bit K / V rows and scales the step wrote, equal to the op-by-op forward's."""
    a, ca, b, cb = fused_and_forward(eng, lens, BS, seed)
    assert a is not None and a.shape == b.shape
    assert torch.equal(a, b), f"rows {len(lens)}: max |diff| {(a - b).abs().max().item():.3g}"
    assert len(ca) == 4 and ca[0].dtype in (torch.int8, torch.float8_e4m3fn)
    for name, x, y in zip(("k", "v", "k_scale", "v_scale"), ca, cb):
        if x.dtype == torch.float8_e4m3fn:  # compare the code bytes (torch.equal has no float8 kernel)
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        assert torch.equal(x, y), f"rows {len(lens)}: the {name} cache differs"


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_kv_step_bit_identical_per_arch_and_thread_count(hf_dirs, arch, threads, kv_dtype):
    """llama: no biases; qwen2: the qkv bias; qwen3: q/k norms before rope and the quantized write;
    int8 and fp8 (e4m3) codes."""
    eng = _engine(hf_dirs[arch], threads=threads, kv_dtype=kv_dtype)
    want = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[kv_dtype]
    assert isinstance(eng.model.layers[0].self_attn.qkv_proj, PackedLinear)
    assert eng.runner.k_cache.dtype == want
    assert eng.runner.fused is not None and eng.runner.fused.kv_dtype == want
    for rows, lens in LENS.items():
        _assert_step_equals_forward(eng, lens, seed=rows)


@pytest.mark.parametrize("threads", [1, 2])
def test_int8_kv_step_bit_identical_on_gguf_q4_1(q4_1_file, threads):
    """The default model's combination: GGUF Q4_1 projections, int8 KV, head_dim 64 (no tails)."""
    eng = _engine(q4_1_file, threads=threads)
    assert isinstance(eng.model.layers[0].mlp.down_proj, GGUFLinear)
    assert eng.runner.fused is not None
    for rows, lens in LENS.items():
        _assert_step_equals_forward(eng, lens, seed=rows)


def test_the_step_writes_the_cache_rows_quantize_kv_writes():
    """The step's row quantization (csrc/kv_int8.h quant_row) is kv_quant.quantize_kv's, byte for
    byte: magnitudes over 80 binades, zero rows, ties at .5 steps, odd head sizes."""
    g = torch.Generator().manual_seed(3)
    ext = kv_quant._native()
    for d in (64, 18, 7, 128):
        x = torch.randn(4000, d, generator=g) * torch.exp(torch.randn(4000, 1, generator=g) * 6)
        x[0] = 0.0
        x[1] = torch.arange(d) - d / 2  # integer steps: x * inv lands on halves
        x[2, 0] = -1e-38
        q, s = ext.quantize_kv_rows(x)
        qr, sr = kv_quant.quantize_kv(x)
        assert torch.equal(s, sr) and torch.equal(q, qr), d
        q, s = ext.quantize_kv_rows(x, fp8=True)  # e4m3: torch's rounding, subnormal codes included
        qr, sr = kv_quant.quantize_kv(x, kv_quant.FP8)
        assert q.dtype == torch.float8_e4m3fn
        assert torch.equal(s, sr) and torch.equal(q.view(torch.uint8), qr.view(torch.uint8)), d


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8", "float32"])
@pytest.mark.parametrize("policy,budget", [(None, None), ("streaming", 24), ("snapkv", 0.3)])
def test_greedy_fused_on_and_off_with_kv_policies(hf_dirs, kv_dtype, policy, budget):
    """Greedy generation with the step equals the op-by-op engine, alone and batched, under the KV
    policies (compressed sequences: shorter block tables, rows no longer positions), int8 and float32
    KV; every decode step ran in the step (only prompt chunks over the chained-row limit fell back)."""
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (60, 7, 90, 33)]
    sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, kv_policy=policy, kv_budget=budget)
    kw = dict(kv_window=8) if policy == "snapkv" else {}
    on = _engine(hf_dirs["qwen3"], threads=2, kv_dtype=kv_dtype, **kw)
    fused = on.runner.fused
    assert fused is not None
    batched = on.generate(prompts, sp)
    single = [on.generate([p], sp)[0] for p in prompts]
    assert fused.steps > 0 and all(why.startswith("the step has prefill tokens") for why in fused.fallbacks)
    if policy is not None:
        assert all(o.kv_tokens < len(p) + 20 for o, p in zip(single, prompts) if len(p) > 30)
    off = _engine(hf_dirs["qwen3"], threads=2, fused=False, kv_dtype=kv_dtype, **kw)
    assert off.runner.fused is None
    plain = off.generate(prompts, sp)
    assert [o.token_ids for o in batched] == [o.token_ids for o in single] == [o.token_ids for o in plain]


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_avx2_env_int8_kv_greedy_tokens_fused_on_and_off(q4_1_file, kv_dtype):
    """LLMOPT_CPU_PATH=avx2 (every machine's floor) and LLMOPT_FUSED_DECODE=0 / 1 in fresh processes,
    int8 and fp8 KV: the same tokens with and without the step."""
    if "avx2" not in G.available_paths():
        pytest.skip("no AVX2 build")
    got = avx2_greedy_fused_on_and_off(q4_1_file, f"kv_dtype='{kv_dtype}'")
    assert got["1"].split(" ", 3)[3] == got["0"].split(" ", 3)[3]


def test_int8_kv_without_scales_falls_back_with_a_reason(hf_dirs, caplog):
    """An int8 cache the step cannot read (its scales missing) is refused with a reason, logged."""
    eng = _engine(hf_dirs["llama"])
    attn = eng.model.layers[1].self_attn
    attn.k_scale = None
    assert fused_decode._why_not(eng.model) == "the 8-bit KV cache has no contiguous float32 scales"
    with caplog.at_level("INFO", logger="llmopt.engine.fused_decode"):
        assert fused_decode.FusedDecoder.build(eng.model) is None
    assert "decode runs op by op" in caplog.text and "no contiguous float32 scales" in caplog.text


def test_step_checks_its_int8_cache_inputs(hf_dirs):
    """Scales of the wrong shape, or scales next to a float cache, are refused at set-up."""
    eng = _engine(hf_dirs["llama"])
    ext = decode_step.native()
    cfg = eng.model.cfg
    layer, attn = eng.model.layers[0], eng.model.layers[0].self_attn
    none = torch.empty(0)

    def build(kc, vc, ks, vs):
        t = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight, none, none, kc, vc, ks, vs]
        return ext.DecodeStep(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                              1e-6, 0.25, t, [-1], eng.model.norm.weight, eng.model.rope_table(torch.float32))

    build(attn.k_cache, attn.v_cache, attn.k_scale, attn.v_scale)
    with pytest.raises(RuntimeError, match="an 8-bit k/v cache needs contiguous float32"):
        build(attn.k_cache, attn.v_cache, attn.k_scale[:, :-1].contiguous(), attn.v_scale)
    with pytest.raises(RuntimeError, match="an 8-bit k/v cache needs contiguous float32"):
        build(attn.k_cache, attn.v_cache, none, none)
    f = torch.zeros(attn.k_cache.shape)
    with pytest.raises(RuntimeError, match="a float32 or float16 k/v cache takes no scales"):
        build(f, f, attn.k_scale, attn.v_scale)
    with pytest.raises(RuntimeError, match="k and v of one type"):
        build(attn.k_cache, f, attn.k_scale, attn.v_scale)
    with pytest.raises(RuntimeError, match="k and v of one type"):  # int8 K codes with e4m3 V codes
        build(attn.k_cache, attn.v_cache.view(torch.float8_e4m3fn), attn.k_scale, attn.v_scale)
