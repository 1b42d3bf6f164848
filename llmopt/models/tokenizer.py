"""Tokenizer: a Hugging Face fast tokenizer (from ``tokenizer.json`` or rebuilt from GGUF metadata)
with the chat template, the stop tokens and an incremental detokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

_CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>")


class Tokenizer:
    def __init__(self, hf: PreTrainedTokenizerBase, eos_token_ids: Sequence[int] = ()):
        self.hf = hf
        ids = set(int(i) for i in eos_token_ids)
        if hf.eos_token_id is not None:
            ids.add(int(hf.eos_token_id))
        self.eos_token_ids = sorted(ids)
        # Tokens that end a chat turn stop generation too (llama.cpp's EOG set).
        vocab = hf.get_vocab()
        self.stop_token_ids = sorted(ids | {vocab[t] for t in _CHAT_END_TOKENS if t in vocab})

    @classmethod
    def from_dir(cls, path: str, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        return cls(AutoTokenizer.from_pretrained(path), eos_token_ids)

    @classmethod
    def from_gguf_fields(cls, arch: str, fields: dict[str, Any], eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        """Build from GGUF metadata (``fields``: key -> python value) with transformers' converters."""
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            _SPECIAL_TOKENS,
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )

        grouped = {
            group: {name: fields[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in fields}
            for group, renames in GGUF_TOKENIZER_MAPPING.items()
        }
        tok_dict, tok_cfg = grouped["tokenizer"], grouped["tokenizer_config"]
        if tok_dict.get("tokenizer_type") == "llama":
            tok_cfg.setdefault("add_bos_token", True)
        for name, key in _SPECIAL_TOKENS.items():
            tid = fields.get(f"tokenizer.ggml.{key}")
            tok_cfg[name] = tok_dict["tokens"][tid] if tid is not None else None
        backend, extra = convert_gguf_tokenizer(arch, tok_dict)
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, **tok_cfg, **extra)
        return cls(hf, eos_token_ids)

    # ---- encoding ----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text if isinstance(text, str) else "".join(text)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        if not self.hf.chat_template:
            raise ValueError("this model's tokenizer has no chat template: pass plain prompts instead of messages")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        # The template writes the special tokens itself (e.g. <bos>): do not add them again.
        return self.hf.encode(text, add_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting a multi-byte character
    (the vLLM prefix/read-offset scheme: decode a short window and emit only what is complete)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""
