"""Jump-forward: once the model writes the first token of a tag of the think/answer format, the engine
appends the rest of the tag in one step; on a model that writes the format itself nothing changes."""

import pytest

from llmopt import LLM, SamplingParams
from llmopt.models.registry import REASONING_MODEL
from llmopt.reasoning.budget import Phase, ThinkTracker, jump_forward_ids
from llmopt.reasoning.format import format_ok
from llmopt.tasks.base import REASONING_SYSTEM_PROMPT
from tests.conftest import requires_smollm2

OPEN, CLOSE, ANSWER_CLOSE = [1, 2, 3], [5, 2, 3, 4, 1, 6, 3], [5, 6, 3]  # "<think>", "</think>\n<answer>", ...


def _tracker(phase: Phase, **kw) -> ThinkTracker:
    t = ThinkTracker()
    t.phase = phase
    for k, v in kw.items():
        setattr(t, k, v)
    return t


@pytest.mark.parametrize("phase, out, kw, want", [
    (Phase.PENDING, [1], {}, [2, 3]),  # "<" opens the output: "think>"
    (Phase.PENDING, [9], {}, []),
    (Phase.THINKING, [2, 9, 5], {}, [2, 3, 4, 1, 6, 3]),  # "</" in the think part: "think>\n<answer>"
    (Phase.THINKING, [2, 9, 5], dict(closed_by="budget"), []),  # the engine is writing its own closing text
    (Phase.THINKING, [2, 9, 1], {}, []),
    (Phase.ANSWER, [7, 5], {}, [6, 3]),  # "</" in the answer: "answer>"
    (Phase.ANSWER, [7, 5], dict(answer_closed=True), []),
    (Phase.NONE, [1], {}, []),  # not the format: nothing
    (Phase.NONE, [5], {}, []),
])
def test_jump_forward_writes_the_rest_of_the_tag_the_model_started(phase, out, kw, want):
    assert jump_forward_ids(_tracker(phase, **kw), out, OPEN, CLOSE, ANSWER_CLOSE) == want


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_jump_forward_is_a_value_error(bad):
    with pytest.raises(ValueError, match="jump_forward"):
        SamplingParams(jump_forward=bad)


def test_jump_forward_cannot_be_combined_with_guided_decoding():
    with pytest.raises(ValueError, match="guided decoding"):
        SamplingParams(jump_forward=True, guided_choice=["a", "b"])


def test_jump_forward_leaves_an_output_outside_the_format_alone(tiny_models):
    llm = LLM(str(tiny_models["llama"][1]), kv_cache_memory_gb=0.05, block_size=8)
    kw = dict(max_tokens=40, temperature=0.0, ignore_eos=True)
    for prompt in ("Question: what is two and two?\n", "Question: what is two and two?\n<think>"):
        off = llm.generate([prompt], SamplingParams(**kw))[0]
        on = llm.generate([prompt], SamplingParams(**kw, jump_forward=True))[0]
        assert on.token_ids == off.token_ids  # the random model never writes a tag's first token here


@pytest.fixture(scope="module")
def reasoning():
    return LLM(REASONING_MODEL, kv_cache_memory_gb=0.25, num_threads=1)


CONVS = [[{"role": "system", "content": REASONING_SYSTEM_PROMPT}, {"role": "user", "content": "What is 17 * 24?"}],
         [{"role": "user", "content": "Tom has 3 apples and buys 5 more. How many apples does he have?"}],
         [{"role": "system", "content": REASONING_SYSTEM_PROMPT},
          {"role": "user", "content": "Is 91 a prime number? Answer yes or no."}]]


@requires_smollm2
def test_jump_forward_on_the_reasoning_model_keeps_its_greedy_output_and_saves_decode_steps(reasoning):
    kw = dict(max_tokens=160, temperature=0.0, stop=["</answer>"], include_stop_str_in_output=True)
    eng = reasoning.engine
    off = reasoning.chat(CONVS, SamplingParams(**kw))
    before = eng.stats["jump_forward_tokens"]
    on = reasoning.chat(CONVS, SamplingParams(**kw, jump_forward=True))
    # each output: "think>" after "<", "think>\n<answer>" after "</", "answer>" after "</"
    assert eng.stats["jump_forward_tokens"] - before == len(CONVS) * (2 + 6 + 2)
    for a, b in zip(off, on):
        assert format_ok(b.text), b.text
        assert b.token_ids == a.token_ids and b.text == a.text  # the model writes these scaffolds itself
        assert b.reasoning.forced_tokens == 10 and b.reasoning.closed_by == "model"
        assert b.reasoning.think_tokens == a.reasoning.think_tokens


@requires_smollm2
def test_jump_forward_batched_matches_alone(reasoning):
    kw = dict(max_tokens=160, temperature=0.0, stop=["</answer>"], include_stop_str_in_output=True, jump_forward=True)
    params = [SamplingParams(**kw), SamplingParams(**kw, think_budget=8, answer_budget=24),
              SamplingParams(**kw, loop_exit=True)]
    alone = [reasoning.chat([c], sp)[0].token_ids for c, sp in zip(CONVS, params)]
    prompts = [reasoning.tokenizer.apply_chat_template(c) for c in CONVS]
    batched = reasoning.engine.generate(prompts, params)
    assert [o.token_ids for o in batched] == alone
    assert all(format_ok(o.text) for o in batched)
