"""``quant="q8_0"`` (and q5_1 / q5_0 / q4_1 / q4_0): float weights quantized once at load into a GGUF
type's blocks (llama.cpp's reference rounding, ``gguf.quants``) and run on the native GGUF kernels,
e.g. a model whose LoRA adapter was merged into float weights. The blocks are exactly those of a GGUF
file of that type written from the same model; logits equal that file's; batched greedy = single."""

from __future__ import annotations

import gguf
import pytest
import torch

from llmopt import LLM, SamplingParams
from llmopt.models.gguf_linear import GGUF_QUANTIZE_TYPES, GGUFLinear
from llmopt.models.loader import load_model
from tests.conftest import save_hf_dir, tiny_hf_model, write_gguf

QT = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("q_on_load")
    out = {}
    for arch in ("llama", "qwen2"):  # llama: Q/K rows permuted in GGUF files; qwen2: qkv biases
        m = tiny_hf_model(arch, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32)
        out[arch] = (m, save_hf_dir(m, root / arch), root)
    return out


def _projections(model):
    for layer in model.layers:
        yield from (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)


@pytest.mark.parametrize("qtype", GGUF_QUANTIZE_TYPES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantize_on_load_equals_a_gguf_file_of_that_type(tiny, arch, qtype):
    m, hf_dir, root = tiny[arch]
    llm = LLM(str(hf_dir), quant=qtype.lower(), num_kv_blocks=32)
    model = llm.engine.model
    qt = QT[qtype]
    path = write_gguf(m, root / f"{arch}-{qtype}.gguf", qtype=lambda name: qt)
    ref = load_model(path, gguf_native=True).model
    for got, want in zip(_projections(model), _projections(ref)):
        assert isinstance(got, GGUFLinear) and got.type_names == [qtype] * len(got.parts)
        assert torch.equal(got.weight, want.weight), got.name
        if want.bias is not None:
            assert got.bias is not None and torch.equal(got.bias, want.bias)
    assert isinstance(model.lm_head, GGUFLinear) and torch.equal(model.lm_head.weight, ref.lm_head.weight)
    bits = {"Q8_0": 8.5, "Q5_1": 6.0, "Q5_0": 5.5, "Q4_1": 5.0, "Q4_0": 4.5}[qtype]
    assert model.layers[0].mlp.down_proj.bits_per_weight == pytest.approx(bits)
    # the engine's greedy decoding: batched = single, the one-call decode step running the blocks
    assert llm.engine.runner.fused is not None
    prompts = [[5, 17, 99, 3], [250, 1, 7, 7, 7, 8, 9], [42]]
    p = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    batched = [o.token_ids for o in llm.generate(prompts, p)]
    assert batched == [llm.generate([q], p)[0].token_ids for q in prompts]


def test_logits_equal_the_float_model_on_the_dequantized_blocks(tiny):
    _, hf_dir, _ = tiny["qwen2"]
    q = load_model(hf_dir, quant_config=_config("q8_0")).model
    f = load_model(hf_dir).model
    with torch.no_grad():  # the float model gets the blocks' weights: only summation order differs
        for a, b in zip(_projections(q), _projections(f)):
            b.weight.copy_(a.weight)
        f.lm_head.weight = torch.nn.Parameter(q.lm_head.weight.clone(), requires_grad=False)
        ids = torch.tensor([1, 5, 9, 33, 7, 100, 64, 2])
        got = q.compute_logits(q(ids, torch.arange(len(ids))))
        want = f.compute_logits(f(ids, torch.arange(len(ids))))
    assert (got - want).abs().max() <= 5e-5 * want.abs().max() + 1e-5


def _config(qtype: str):
    from llmopt.config import EngineConfig
    from llmopt.engine.engine import engine_quant_config

    return engine_quant_config(qtype, EngineConfig(num_threads=1))


def test_unknown_gguf_types_are_refused_with_the_list(tiny):
    from llmopt.models.gguf_linear import GGUFQuantizeMethod

    with pytest.raises(ValueError, match="q8_0, q5_1, q5_0, q4_1, q4_0"):
        GGUFQuantizeMethod("q4_k")
    with pytest.raises(ValueError, match="unknown format"):
        LLM(str(tiny["llama"][1]), quant="q3_k", num_kv_blocks=16)
