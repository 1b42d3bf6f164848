"""The real embedded model: SmolLM2-135M-Instruct (llama, GGUF Q4_1) against transformers loading
the same GGUF file with its own loader."""

import pytest
import torch

from llmopt import LLM, SamplingParams
from llmopt.config import KernelSettings
from tests.conftest import requires_smollm2, smollm2_path

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "If a train travels 60 km in 1.5 hours, what is its average speed? Think step by step.",
]


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = smollm2_path()
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    return model, tok


@requires_smollm2
def test_greedy_64_tokens_match_transformers_gguf(hf_model):
    model, hf_tok = hf_model
    # fp32 activations: the dequantized model transformers runs (the default int8 decode rows differ)
    llm = LLM("smollm2-135m-instruct", kv_cache_memory_gb=0.25, kernels=KernelSettings(gguf_act="fp32"))
    msgs = [[{"role": "user", "content": p}] for p in PROMPTS]
    outs = llm.chat(msgs, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    for m, o in zip(msgs, outs):
        enc = hf_tok.apply_chat_template(m, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = enc["input_ids"]
        assert ids[0].tolist() == o.prompt_token_ids  # same chat template and tokenization
        # the explicit attention mask matters: the pad token (<|im_end|>) also occurs in the prompt
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                                 eos_token_id=None, pad_token_id=hf_tok.pad_token_id)
        assert o.token_ids == ref[0, ids.shape[1]:].tolist()


@requires_smollm2
def test_smollm2_answers_and_stops_at_end_of_turn():
    llm = LLM("smollm2-135m-instruct", kv_cache_memory_gb=0.25)
    out = llm.chat([{"role": "user", "content": PROMPTS[0]}], SamplingParams(max_tokens=64, temperature=0))[0]
    assert "Paris" in out.text and out.finish_reason == "stop"
    assert llm.engine.loaded.load_seconds < 30  # generous: the README quotes the measured time
