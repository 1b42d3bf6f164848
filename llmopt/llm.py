"""``LLM``: the offline Python API (vLLM's names), a thin front end over ``LLMEngine``."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from llmopt.config import EngineConfig
from llmopt.engine.engine import LLMEngine, Prompt
from llmopt.engine.sampling_params import SamplingParams
from llmopt.engine.sequence import RequestOutput


class LLM:
    def __init__(self, model: str, quant: str | None = None, group_size: int = 64, dtype: str = "float32",
                 adapter: str | None = None, **engine_kwargs):
        """``model``: a registry name (``llmopt models``), a Hugging Face directory or a .gguf file.
        ``quant``: None = the model as stored (a .gguf file runs on its own quantized blocks, a
        Hugging Face model in fp32); "fp32" = float (a .gguf file dequantized); "gguf" = the file's
        blocks, refused for a non-GGUF model; a format (int8, int4, ...) = quantized on load.
        ``adapter``: a LoRA adapter file (``llmopt train``'s ``adapter.safetensors``) merged at load.
        ``engine_kwargs`` are ``EngineConfig`` fields (max_num_seqs, block_size, num_threads, ...)."""
        self.engine = LLMEngine(model, EngineConfig(dtype=dtype, **engine_kwargs), quant=quant, group_size=group_size,
                                adapter=adapter)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | Seq[str] | Seq[list[int]], params: SamplingParams | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.engine.generate(list(prompts), params)

    def chat(self, conversations: list[dict[str, str]] | list[list[dict[str, str]]],
             params: SamplingParams | None = None) -> list[RequestOutput]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # one conversation
        return self.engine.generate(list(conversations), params)

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Log-probability of each token given the ones before it (float32, length len-1)."""
        return self.engine.score(token_ids)


__all__ = ["LLM", "SamplingParams", "Prompt"]
