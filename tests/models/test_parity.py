"""Our decoder matches transformers on the same weights, loaded from HF directories and GGUF."""

import pytest
import torch

from llmopt import LLM, SamplingParams
from llmopt.models.loader import load_model
from tests.conftest import ARCHS


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", ["hf_dir", "gguf"])
def test_logits_match_transformers_fp32(tiny_models, arch, source):
    hf, hf_dir, gguf_path = tiny_models[arch]
    loaded = load_model(hf_dir if source == "hf_dir" else gguf_path)
    assert loaded.config.arch == arch
    ids = torch.randint(0, 256, (45,), generator=torch.Generator().manual_seed(1))
    ours = loaded.model.compute_logits(loaded.model(ids, torch.arange(len(ids))))
    diff = (ours - _hf_logits(hf, ids)).abs().max().item()
    assert diff < 1e-4, f"max |logit diff| {diff}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", ["hf_dir", "gguf"])
def test_greedy_32_tokens_match_transformers(tiny_models, arch, source):
    hf, hf_dir, gguf_path = tiny_models[arch]
    llm = LLM(str(hf_dir if source == "hf_dir" else gguf_path), kv_cache_memory_gb=0.05)
    prompts = [[5, 17, 99, 3, 250, 7, 7, 80], list(range(40, 77))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert o.token_ids == ref


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bf16_close_to_fp32(tiny_models, arch):
    hf, hf_dir, _ = tiny_models[arch]
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(2))
    l32 = load_model(hf_dir).model
    l16 = load_model(hf_dir, dtype=torch.bfloat16).model
    a = l32.compute_logits(l32(ids, torch.arange(20)))
    b = l16.compute_logits(l16(ids, torch.arange(20)))
    assert l16.embed_tokens.weight.dtype == torch.bfloat16
    rel = (a - b).abs().max() / a.abs().max()
    assert rel < 0.05, rel


def test_sliding_window_matches_transformers(tmp_path):
    from tests.conftest import save_hf_dir, tiny_hf_model

    hf = tiny_hf_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1,
                       attn_implementation="eager")
    assert hf.config.layer_types == ["full_attention", "sliding_attention"]
    d = save_hf_dir(hf, tmp_path / "swa")
    loaded = load_model(d)
    assert loaded.config.layer_windows == [None, 8]
    ids = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(3))
    ours = loaded.model.compute_logits(loaded.model(ids, torch.arange(30)))
    assert (ours - _hf_logits(hf, ids)).abs().max().item() < 1e-4
    # and through the paged engine, decoding past the window
    llm = LLM(str(d), kv_cache_memory_gb=0.05, block_size=4)
    out = llm.generate([ids.tolist()], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    ref = hf.generate(ids[None], max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 30:]
    assert out.token_ids == ref.tolist()


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    from tests.conftest import save_hf_dir, tiny_hf_model

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hf = tiny_hf_model("llama", rope_parameters=rope, attention_bias=True)
    d = save_hf_dir(hf, tmp_path / "l3")
    loaded = load_model(d)
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(4))
    ours = loaded.model.compute_logits(loaded.model(ids, torch.arange(100)))
    assert (ours - _hf_logits(hf, ids)).abs().max().item() < 1e-4


def test_gguf_q8_0_weights_match_dequantized_reference(tiny_models, tmp_path):
    """A quantized GGUF loads to exactly the dequantized weights (checked via gguf's dequantize)."""
    import gguf

    from tests.conftest import write_gguf

    hf = tiny_models["qwen2"][0]
    path = write_gguf(hf, tmp_path / "q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    loaded = load_model(path)
    w = hf.model.layers[0].mlp.down_proj.weight.detach().numpy()
    ref = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                                 gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(loaded.model.layers[0].mlp.down_proj.weight, torch.from_numpy(ref))
