"""Baselines for ``llmopt bench``: the unoptimized original, measured the same way as llmopt.

``TransformersSystem`` is Hugging Face transformers' ``AutoModelForCausalLM.generate`` on exactly
the weights llmopt loads (``load_transformers_model``), in its default configuration (eager
PyTorch modules, SDPA attention, dynamic KV cache):

- the ``concurrency`` prompts of a cell form one batch, left-padded (all bench prompts have the
  same length, so the padding is empty, but mixed lengths would work);
- greedy decoding, exactly ``output_len`` new tokens: ``max_new_tokens = min_new_tokens =
  output_len`` and ``eos_token_id=None``, so EOS neither stops a row nor is masked out — the same
  as llmopt's ``ignore_eos`` — and both systems should pick the same greedy tokens;
- every generated token is timestamped by a streamer that ``generate`` calls right after each
  step's token selection (all rows of a batch share a step, so they share the timestamp, as in
  llmopt's engine).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmopt.bench.grid import RunResult


def _clock_streamer() -> Any:
    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        """Records ``perf_counter()`` at each generated step (the first ``put`` is the prompt)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._seen_prompt = False

        def put(self, value: Any) -> None:
            if not self._seen_prompt:
                self._seen_prompt = True
                return
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    return StepClock()


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """Token-id lists -> (input_ids, attention_mask), int64 [B, max_len], padded on the left."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids, mask


def _hf_logprobs(model: Any, ids: Any) -> Any:
    """log p (float64) of every token after the first under a transformers causal LM, one forward."""
    import torch

    x = torch.tensor([list(ids)])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)
    return logp.gather(1, x[0, 1:, None])[:, 0]


class TransformersSystem:
    """transformers ``generate``, batched at the cell's concurrency (see the module docstring)."""

    def __init__(self, model: str, threads: int):
        import torch
        import transformers

        from llmopt.models.loader import load_transformers_model

        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.model = load_transformers_model(model, dtype=torch.float32)
        cfg = self.model.config
        self.vocab_size = cfg.vocab_size
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        self.info = {"transformers": transformers.__version__, "dtype": "float32",
                     "attn_implementation": getattr(cfg, "_attn_implementation", None),
                     "load_seconds": round(time.perf_counter() - t0, 3)}

    def quality(self, id_lists: list[list[int]]) -> dict[str, Any]:
        """Bits per weight of the linear layers as transformers holds them (fp32) and perplexity over
        ``id_lists``: one causal forward per text, scored by llmopt's own loop."""
        from llmopt.bench.grid import quality_record
        from llmopt.quant.calib import score_token_ids
        from llmopt.tasks.evaluate import linear_bits_per_weight

        nll, n = score_token_ids(self.model, id_lists, _hf_logprobs)
        return quality_record(linear_bits_per_weight(self.model), nll, n)

    def run(self, prompts: list[list[int]], output_len: int) -> RunResult:
        import torch

        clock = _clock_streamer()
        t0 = time.perf_counter()
        ids, mask = left_pad(prompts, self.pad_id)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=output_len,
                min_new_tokens=output_len, eos_token_id=None, pad_token_id=self.pad_id, streamer=clock,
            )
        new = out[:, ids.shape[1]:].tolist()
        t_end = time.perf_counter()
        if len(clock.times) != output_len:
            raise RuntimeError(f"transformers generated {len(clock.times)} steps instead of {output_len}")
        return t0, t_end, new, [list(clock.times) for _ in prompts], {}
