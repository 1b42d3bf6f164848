"""GGUF files run on their own quantized blocks (the "gguf" linear method, the default for .gguf
files): logits equal the dequantized fp32 model's up to float summation order, for every GGUF type
with a native kernel, with llama's Q/K row permutation, qwen2's biases, a tied and an untied output
layer, fused projections mixing types and a float shard; the engine's batched greedy equals single
greedy; on the real SmolLM2 file greedy tokens equal the fp32 path's."""

from __future__ import annotations

import gguf
import pytest
import torch

from llmopt import LLM, SamplingParams
from llmopt.kernels.dense import PackedLinear
from llmopt.kernels.gguf_linear import bf16x3_available
from llmopt.models import gguf_linear as gguf_layers
from llmopt.models.gguf_linear import GGUFEmbedding, GGUFLinear, _kind_rows
from llmopt.models.loader import load_model
from tests.conftest import SMOLLM2, gguf_blocks, requires_smollm2, save_hf_dir, tiny_hf_model, write_gguf

QT = gguf.GGMLQuantizationType
BLOCK_TYPES = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0]  # gguf.quants quantizes these
K_TYPES = [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]  # gguf.quants cannot: random valid blocks
# Tolerance: fp32 summation in another order over K <= 512 terms per output, through 2 layers:
# max |diff| / max |logit| measured 4e-7 .. 6e-6 over these types and archs; a wrong block, row
# order or scale gives O(1).
RTOL = 5e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> transformers model; hidden / intermediate multiples of 256 so K-quants fit."""
    return {arch: tiny_hf_model(arch, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=64) for arch in ("llama", "qwen2")}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(len(ids))))


def _assert_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert torch.isfinite(got).all() and err <= RTOL * scale + 1e-5, f"{what}: max |diff| {err:.3g}, |ref| {scale:.3g}"


@pytest.mark.parametrize("qt", BLOCK_TYPES + K_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_native_logits_equal_the_dequantized_model(tiny, tmp_path, arch, qt):
    path = write_gguf(tiny[arch], tmp_path / f"{arch}-{qt.name}.gguf", qtype=qt, quantizer=gguf_blocks)
    native = load_model(path, gguf_native=True).model
    ref = load_model(path).model  # float nn.Linear on the dequantized weights
    for i, layer in enumerate(native.layers):
        for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            assert isinstance(lin, GGUFLinear) and lin.type_names == [qt.name] * len(lin.parts), (i, lin)
    assert isinstance(native.lm_head, GGUFLinear) and isinstance(native.embed_tokens, GGUFEmbedding)
    assert native.embed_tokens.type_name == qt.name and native.lm_head.type_names == [qt.name]
    # the weights the blocks hold are the dequantized model's, rows in Hugging Face order
    assert torch.equal(native.layers[1].self_attn.qkv_proj.weight, ref.layers[1].self_attn.qkv_proj.weight)
    assert torch.equal(native.embed_tokens(torch.arange(50)), ref.embed_tokens(torch.arange(50)))
    # decode-sized lookups come from the row cache (rows decoded by an earlier small lookup, or now)
    emb = native.embed_tokens
    for ids in (torch.tensor([7]), torch.tensor([[3, 7, 3], [250, 0, 7]]), torch.tensor([9], dtype=torch.int32)):
        assert torch.equal(emb(ids), ref.embed_tokens(ids.long())), ids
    assert {0, 3, 7, 9, 250} <= set(emb._rows)
    with pytest.raises(IndexError, match="out of range"):
        emb(torch.tensor([1, emb.num_embeddings]))
    ids = torch.tensor([1, 5, 9, 33, 7, 100, 64, 2, 250, 3])
    _assert_close(_logits(native, ids), _logits(ref, ids), f"{arch} {qt.name}")


def test_fused_projection_mixing_types_and_a_float_shard(tiny, tmp_path):
    """A Q4_K_M-like file: attn_v and ffn_down in Q6_K inside Q4_K projections (qkv = two row
    ranges), and one projection stored F16 (no block kernel: it stays float, packed)."""
    def qtype(name: str):
        if name == "blk.1.attn_output.weight":
            return QT.F16
        return QT.Q6_K if name.endswith(("attn_v.weight", "ffn_down.weight")) else QT.Q4_K

    path = write_gguf(tiny["llama"], tmp_path / "mixed.gguf", qtype=qtype, quantizer=gguf_blocks)
    native = load_model(path, gguf_native=True).model
    assert native.layers[0].self_attn.qkv_proj.type_names == ["Q4_K", "Q6_K"]
    assert native.layers[0].mlp.down_proj.type_names == ["Q6_K"]
    assert type(native.layers[1].self_attn.o_proj) is torch.nn.Linear  # float, from the F16 tensor
    ref = load_model(path).model
    ids = torch.tensor([4, 8, 15, 16, 23, 42])
    _assert_close(_logits(native, ids), _logits(ref, ids), "mixed")
    # the two-part qkv with token kinds in two runs: each run written in place, part by part
    models = {act: load_model(path, gguf_native=True, gguf_act=act).model for act in ("fp32", "int8", "by-kind")}
    x = torch.randn(6, native.layers[0].self_attn.qkv_proj.in_features, generator=torch.Generator().manual_seed(1))
    name = "layers.0.self_attn.qkv_proj"
    with torch.no_grad():
        for mask in ([True, True, False, False, False, False], [False, False, False, False, True, True]):
            gen = torch.tensor(mask)
            y = models["by-kind"].get_submodule(name)(x, gen)
            assert torch.equal(y[gen], models["int8"].get_submodule(name)(x[gen]))
            assert torch.equal(y[~gen], models["by-kind"].get_submodule(name)(x[~gen]))  # prompt rows alone
    # by-kind's prompt rows are the fp32 mode's with int16 prompt rows off
    gguf_layers.configure(prompt_int16=False)
    exact = load_model(path, gguf_native=True, gguf_act="by-kind").model.get_submodule(name)
    with torch.no_grad():
        assert torch.equal(exact(x), models["fp32"].get_submodule(name)(x))


@pytest.fixture(scope="module")
def q41_file(tiny, tmp_path_factory):
    return write_gguf(tiny["qwen2"], tmp_path_factory.mktemp("q41") / "q41.gguf", qtype=QT.Q4_1)


def test_engine_runs_gguf_blocks_by_default_and_fp32_on_request(q41_file):
    llm = LLM(str(q41_file), num_kv_blocks=64)
    assert isinstance(llm.engine.model.layers[0].mlp.down_proj, GGUFLinear)
    assert llm.engine.runner.fused is not None  # the one-call decode step runs the GGUF blocks too
    fp32 = LLM(str(q41_file), quant="fp32", num_kv_blocks=64)
    assert isinstance(fp32.engine.model.layers[0].mlp.down_proj, PackedLinear)
    ids = [5, 17, 99, 3, 250, 1, 7]
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    assert llm.generate([ids], p)[0].token_ids == fp32.generate([ids], p)[0].token_ids


def test_gguf_batched_greedy_equals_single_greedy(q41_file):
    llm = LLM(str(q41_file), num_kv_blocks=128)
    prompts = [[5, 17, 99, 3], [250, 1, 7, 7, 7, 8, 9, 10, 11], [42], [100, 101, 102, 103, 104, 105]]
    p = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    batched = [o.token_ids for o in llm.generate(prompts, p)]
    single = [llm.generate([q], p)[0].token_ids for q in prompts]
    assert batched == single


def test_quant_gguf_on_a_non_gguf_model_is_refused(tiny, tmp_path):
    d = save_hf_dir(tiny["qwen2"], tmp_path / "hf")
    with pytest.raises(ValueError, match="not a .gguf file"):
        LLM(str(d), quant="gguf", num_kv_blocks=16)


@requires_smollm2
def test_smollm2_gguf_native_greedy_tokens_equal_fp32():
    """The default model file (Q4_1, Q8_0 tied embedding): 3 prompts x 24 greedy tokens, fp32 activations
    (prompt rows on AMX-BF16 tiles where the CPU has them: fp32 up to rounding, not the chain's bits).
    The default by-kind mode decodes with int8 activations, which is not exact, so its tokens may leave
    the fp32 model's at a near tie (one of these 72 does on an AMX CPU): not asserted here."""
    from llmopt.config import KernelSettings

    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    p = SamplingParams(max_tokens=24, temperature=0.0)
    native = LLM(SMOLLM2, num_kv_blocks=64, kernels=KernelSettings(gguf_act="fp32"))
    assert isinstance(native.engine.model.lm_head, GGUFLinear)
    assert native.engine.model.lm_head.type_names == ["Q8_0"]
    got = [o.token_ids for o in native.generate(prompts, p)]
    del native
    want = [o.token_ids for o in LLM(SMOLLM2, quant="fp32", num_kv_blocks=64).generate(prompts, p)]
    assert got == want


def test_int8_activation_mode_is_opt_in_per_type_and_batch_invariant(tiny, tmp_path):
    """``KernelSettings(gguf_act="int8")``: Q4_1 projections quantize activations per 32 (llama.cpp's
    Q8 activations), Q3_K ones (no int8 kernel) stay fp32; greedy tokens batched == single."""
    from llmopt.config import KernelSettings

    def qtype(name: str):
        return QT.Q3_K if name.endswith("ffn_down.weight") else QT.Q4_1

    path = write_gguf(tiny["qwen2"], tmp_path / "a8.gguf", qtype=qtype, quantizer=gguf_blocks)
    llm = LLM(str(path), num_kv_blocks=128, kernels=KernelSettings(gguf_act="int8"))
    m = llm.engine.model
    assert m.layers[0].self_attn.qkv_proj.acts == ["int8"] and m.layers[0].mlp.down_proj.acts == ["fp32"]
    ref = load_model(path).model
    ids = torch.tensor([4, 8, 15, 16, 23, 42])
    got, want = _logits(m, ids), _logits(ref, ids)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert 0 < rel < 0.05, rel  # int8 activations: close, and not the exact mode
    prompts = [[5, 17, 99, 3], [250, 1, 7, 7, 7, 8, 9, 10, 11], [42]]
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in llm.generate(prompts, p)] == [llm.generate([q], p)[0].token_ids for q in prompts]


def test_by_kind_mode_prompt_rows_fp32_generated_rows_int8(tiny, tmp_path):
    """``gguf_act="by-kind"`` with int16 prompt rows off (``gguf_prompt_int16=False``, the exact variant): a
    row marked generated computes exactly what the int8 mode computes, a prompt row exactly what the fp32
    mode computes, in one mixed call; a prompt's log-probabilities equal the fp32 mode's bit for bit; greedy
    tokens batched == single. (With int16 prompt rows: ``test_prompt_rows_on_int16_activations``.)"""
    from llmopt.config import KernelSettings

    def qtype(name: str):
        return QT.Q3_K if name.endswith("ffn_down.weight") else QT.Q4_1

    path = write_gguf(tiny["qwen2"], tmp_path / "kind.gguf", qtype=qtype, quantizer=gguf_blocks)
    gguf_layers.configure(prompt_int16=False)
    models = {act: load_model(path, gguf_native=True, gguf_act=act).model for act in ("fp32", "int8", "by-kind")}
    prompt_act = "bf16x3" if bf16x3_available() else "fp32"  # fp32 prompt rows on AMX-BF16 tiles where present
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(3))
    # kinds interleaved (gathered and scattered), and in two runs either way round (row slices written in place)
    masks = [[True, False, True, True, False, False, True], [True, True, False, False, False, False, False],
             [False, False, False, False, False, True, True]]
    with torch.no_grad():
        down = models["by-kind"].layers[1].mlp.down_proj  # Q3_K: no int8 kernel, fp32 for both kinds
        assert down.acts == down.prompt_acts == ["fp32"]
        for name in ("layers.0.self_attn.qkv_proj", "lm_head"):
            lin = models["by-kind"].get_submodule(name)
            assert lin.acts == ["int8"] and lin.prompt_acts == [prompt_act]
            for mask, split in zip(masks, (None, 2, 5), strict=True):
                gen = torch.tensor(mask)
                assert _kind_rows(gen)[2] == split  # two runs: written in place, not gathered / scattered
                y = lin(x, gen)
                assert torch.equal(y[gen], models["int8"].get_submodule(name)(x[gen])), mask
                assert torch.equal(y[~gen], models["fp32"].get_submodule(name)(x[~gen])), mask
                assert not torch.equal(y[gen], models["fp32"].get_submodule(name)(x[gen]))
            assert torch.equal(lin(x), models["fp32"].get_submodule(name)(x))  # no kinds given: prompt rows
    ids = [4, 8, 15, 16, 23, 42, 7, 99, 3, 250]
    kind = LLM(str(path), num_kv_blocks=128, kernels=KernelSettings(gguf_act="by-kind", gguf_prompt_int16=False))
    fp32 = LLM(str(path), num_kv_blocks=128, kernels=KernelSettings(gguf_act="fp32"))
    assert torch.equal(kind.engine.score(ids), fp32.engine.score(ids))
    prompts = [[5, 17, 99, 3], [250, 1, 7, 7, 7, 8, 9, 10, 11], [42]]
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in kind.generate(prompts, p)] == [kind.generate([q], p)[0].token_ids for q in prompts]


def test_prompt_rows_on_amx_bf16_where_present_and_the_setting_turns_it_off(tiny, tmp_path):
    """fp32 prompt rows take act="bf16x3" where the CPU has AMX-BF16 (types with the int8 kernel; Q3_K
    stays fp32), generated rows never; ``KernelSettings(gguf_bf16x3=False)`` gives the fp32 chain
    everywhere. Prompt logits agree with the fp32 chain's to fp32 rounding; greedy batched == single."""
    from llmopt.config import KernelSettings

    def qtype(name: str):
        return QT.Q3_K if name.endswith("ffn_down.weight") else QT.Q4_1

    path = write_gguf(tiny["llama"], tmp_path / "bf3.gguf", qtype=qtype, quantizer=gguf_blocks)
    on = LLM(str(path), num_kv_blocks=128, kernels=KernelSettings(gguf_act="fp32"))
    off = LLM(str(path), num_kv_blocks=128, kernels=KernelSettings(gguf_act="fp32", gguf_bf16x3=False))
    want = "bf16x3" if bf16x3_available() else "fp32"
    for name, llm, prompt in (("on", on, want), ("off", off, "fp32")):
        m = llm.engine.model
        assert m.layers[0].self_attn.qkv_proj.prompt_acts == [prompt], name
        assert m.layers[0].self_attn.qkv_proj.acts == ["fp32"], name
        assert m.layers[0].mlp.down_proj.prompt_acts == ["fp32"], name  # Q3_K: no bf16x3 kernel
    ids = [4, 8, 15, 16, 23, 42, 7, 99, 3, 250]
    a, b = on.engine.score(ids), off.engine.score(ids)
    assert torch.allclose(a, b, rtol=0, atol=1e-4), (a - b).abs().max()
    if want == "bf16x3":
        assert not torch.equal(a, b)  # really another kernel
    prompts = [[5, 17, 99, 3], [250, 1, 7, 7, 7, 8, 9, 10, 11], [42]]
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in on.generate(prompts, p)] == [on.generate([q], p)[0].token_ids for q in prompts]


def test_prompt_rows_on_int16_activations(tiny, tmp_path):
    """``KernelSettings(gguf_prompt_int16=True)``: by-kind prompt rows of types with the int8 kernel take
    act="int16" (Q3_K stays fp32; AMX-BF16 tiles still win where present), generated rows keep int8. Prompt
    logits agree with the fp32 chain's (``gguf_prompt_int16=False``) to ~1e-4; greedy batched == single. By
    default (None) int16 where the build has VNNI; the "fp32" mode never takes it."""
    from llmopt.config import KernelSettings
    from llmopt.kernels.gguf_linear import int16_fast

    def qtype(name: str):
        return QT.Q3_K if name.endswith("ffn_down.weight") else QT.Q4_1

    path = write_gguf(tiny["llama"], tmp_path / "i16.gguf", qtype=qtype, quantizer=gguf_blocks)
    on = LLM(str(path), num_kv_blocks=128, kernels=KernelSettings(gguf_prompt_int16=True, gguf_bf16x3=False))
    off = LLM(str(path), num_kv_blocks=128, kernels=KernelSettings(gguf_prompt_int16=False, gguf_bf16x3=False))
    auto = LLM(str(path), num_kv_blocks=128, kernels=KernelSettings(gguf_bf16x3=False))
    fp32 = LLM(str(path), num_kv_blocks=128, kernels=KernelSettings(gguf_act="fp32", gguf_prompt_int16=True,
                                                                    gguf_bf16x3=False))
    m = on.engine.model
    assert m.layers[0].self_attn.qkv_proj.prompt_acts == ["int16"] and m.layers[0].self_attn.qkv_proj.acts == ["int8"]
    assert m.layers[0].mlp.down_proj.prompt_acts == ["fp32"]  # Q3_K: no int16 kernel
    assert off.engine.model.layers[0].self_attn.qkv_proj.prompt_acts == ["fp32"]
    assert auto.engine.model.layers[0].self_attn.qkv_proj.prompt_acts == ["int16" if int16_fast() else "fp32"]
    assert fp32.engine.model.layers[0].self_attn.qkv_proj.prompt_acts == ["fp32"]
    ids = [4, 8, 15, 16, 23, 42, 7, 99, 3, 250]
    a, b = on.engine.score(ids), off.engine.score(ids)
    assert torch.allclose(a, b, rtol=0, atol=1e-3), (a - b).abs().max()
    assert not torch.equal(a, b)  # really another kernel
    prompts = [[5, 17, 99, 3], [250, 1, 7, 7, 7, 8, 9, 10, 11], [42]]
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in on.generate(prompts, p)] == [on.generate([q], p)[0].token_ids for q in prompts]
