"""Shared by the efficient-reasoning engine tests (budgets, loop exit, early exit, low-confidence exit)."""

from llmopt import SamplingParams

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
