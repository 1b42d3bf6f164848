"""Shared by the efficient-reasoning engine tests (budgets, loop exit, early exit, low-confidence exit, think
gate)."""

from llmopt import LLM, SamplingParams

# the tiny random model never writes <think> itself: the prompt ends with it (the assistant prefix forced by
# the caller), so the output starts inside the think part
OPEN_PROMPT = "Question: what is two and two?\n<think>"
PLAIN_PROMPT = "Question: what is two and two?\n"


def reasoning_params(default_max_tokens: int, **kw) -> SamplingParams:
    """Greedy, EOS ignored, ending at (and keeping) ``</answer>``, ``default_max_tokens`` unless ``kw`` sets
    ``max_tokens``; plus ``kw``."""
    base = dict(max_tokens=default_max_tokens, temperature=0.0, ignore_eos=True, stop=["</answer>"],
                include_stop_str_in_output=True)
    return SamplingParams(**(base | kw))


def assert_batched_matches_single(llm, prompts: list[str], params: list[SamplingParams], closed_by: str,
                                  min_fired: int) -> None:
    """The prompts run together give each one's tokens alone; the exit ``closed_by`` fired at least
    ``min_fired`` times, each counted once in the engine's ``f"{closed_by}_exits"`` stat; no block leaks."""
    singles = [llm.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    before = llm.engine.stats[f"{closed_by}_exits"]
    batched = llm.engine.generate(prompts, params)
    assert [o.token_ids for o in batched] == [o.token_ids for o in singles]
    fired = sum(o.reasoning.closed_by == closed_by for o in batched)
    assert fired >= min_fired and llm.engine.stats[f"{closed_by}_exits"] - before == fired
    assert llm.engine.block_manager.num_used_blocks == 0


def plain_and_speculative(tiny_models) -> tuple[LLM, LLM]:
    """The tiny Llama twice: decoding plainly and with n-gram speculative decoding (for "speculative decoding
    exits where plain decoding does" checks)."""
    path = str(tiny_models["llama"][1])
    return (LLM(path, kv_cache_memory_gb=0.05, block_size=8),
            LLM(path, kv_cache_memory_gb=0.05, block_size=8, speculative="ngram"))
