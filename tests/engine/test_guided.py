"""Guided decoding: grammar masks hold with every sampling setting, batching, preemption, prefix
caching, stop strings and logprobs; bad grammars are ValueErrors; the real model keeps the
competition format and valid JSON."""

import json
import math
import re
import sys

import pytest
import torch

from llmopt import LLM, SamplingParams
from llmopt.engine import guided as guided_mod
from llmopt.engine.guided import GuidedSpec, apply_bitmask, unpack_bitmask
from llmopt.reasoning.format import parse_output
from tests.conftest import SMOLLM2, requires_smollm2

# bounded, so a random model must finish it within max_tokens (the tiny tokenizer is byte-level)
REGEX = r"(yes|no), [0-9]{1,3} [a-z]{2,6}(, [a-z]{2,6}){0,2}\."
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "n", "ok", "tags"],
    "additionalProperties": False,
}
SAMPLING = [dict(temperature=0.0), dict(temperature=1.0, seed=1), dict(temperature=1.3, seed=2, top_k=20),
            dict(temperature=0.9, seed=3, top_p=0.8), dict(temperature=2.0, seed=4, top_k=50, top_p=0.95)]


def _prompts(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _valid(obj):
    """SCHEMA, checked by hand (no jsonschema dependency)."""
    return (isinstance(obj, dict) and set(obj) == {"name", "n", "ok", "tags"}
            and isinstance(obj["name"], str) and len(obj["name"]) <= 6
            and type(obj["n"]) is int and 0 <= obj["n"] <= 999 and type(obj["ok"]) is bool
            and isinstance(obj["tags"], list) and len(obj["tags"]) <= 3
            and all(t in ("red", "green", "blue") for t in obj["tags"]))


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, kv_cache_memory_gb=0.05)


@pytest.mark.parametrize("sampling", SAMPLING, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_guided_regex_output_always_fullmatches(llm, sampling):
    outs = llm.generate(_prompts(), SamplingParams(max_tokens=64, guided_regex=REGEX, **sampling))
    for o in outs:
        assert o.finish_reason == "stop", o.text
        assert re.fullmatch(REGEX, o.text), o.text


@pytest.mark.parametrize("sampling", SAMPLING[:3], ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_guided_json_output_parses_and_validates(llm, sampling):
    outs = llm.generate(_prompts(), SamplingParams(max_tokens=120, guided_json=SCHEMA, **sampling))
    for o in outs:
        assert o.finish_reason == "stop", o.text
        assert _valid(json.loads(o.text)), o.text


def test_guided_json_accepts_a_schema_string_and_json_object(llm):
    outs = llm.generate(_prompts(3), SamplingParams(max_tokens=120, temperature=1.0, seed=5,
                                                    guided_json=json.dumps(SCHEMA)))
    assert all(_valid(json.loads(o.text)) for o in outs)


def test_guided_choice_output_is_one_of_the_choices(llm):
    choices = ["alpha", "beta", "gamma delta"]
    for seed in range(3):
        outs = llm.generate(_prompts(), SamplingParams(max_tokens=32, temperature=1.0, seed=seed, guided_choice=choices))
        assert all(o.text in choices and o.finish_reason == "stop" for o in outs)


def test_complete_grammar_finishes_with_stop_and_no_eos_token(llm):
    out = llm.generate(_prompts(1), SamplingParams(max_tokens=32, temperature=0.0, guided_choice=["yes"]))[0]
    assert out.text == "yes" and out.finish_reason == "stop"
    assert not set(out.token_ids) & set(llm.tokenizer.stop_token_ids)
    assert len(out.token_ids) <= 3


def test_eos_is_allowed_only_where_the_grammar_accepts(llm):
    # "ab" then optionally more: EOS may end it after "ab" but never before
    outs = llm.generate(_prompts(), SamplingParams(max_tokens=40, temperature=1.5, seed=7, guided_regex=r"ab[a-z]{0,30}"))
    stop_ids = set(llm.tokenizer.stop_token_ids)
    for o in outs:
        assert re.fullmatch(r"ab[a-z]{0,30}", o.text)
        eos_at = [i for i, t in enumerate(o.token_ids) if t in stop_ids]
        assert all(i >= 2 for i in eos_at)


@pytest.fixture(scope="module")
def guided_singles(llama_dir):
    single = LLM(llama_dir, kv_cache_memory_gb=0.05, max_num_seqs=1)
    return [single.generate([p], SamplingParams(max_tokens=64, temperature=0.0, guided_regex=REGEX))[0].token_ids
            for p in _prompts(12, seed=1)]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_batched_guided_greedy_matches_single(llama_dir, guided_singles, prefix_caching):
    llm = LLM(llama_dir, kv_cache_memory_gb=0.05, enable_prefix_caching=prefix_caching)
    prompts = _prompts(12, seed=1)
    # guided and unguided rows in one batch: the masks must land on the right rows
    params = [SamplingParams(max_tokens=64, temperature=0.0, guided_regex=REGEX) if i % 2 == 0
              else SamplingParams(max_tokens=20, temperature=0.0) for i in range(len(prompts))]
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs[::2]] == guided_singles[::2]
    # all guided, prompts repeated so the prefix cache serves the second copy
    outs = llm.generate(prompts + prompts, SamplingParams(max_tokens=64, temperature=0.0, guided_regex=REGEX))
    assert [o.token_ids for o in outs] == guided_singles + guided_singles


def test_guided_state_is_kept_through_preemption(llama_dir, guided_singles):
    llm = LLM(llama_dir, num_kv_blocks=10, block_size=8)
    outs = llm.generate(_prompts(12, seed=1), SamplingParams(max_tokens=64, temperature=0.0, guided_regex=REGEX))
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == guided_singles


def test_seeded_guided_sampling_is_the_same_alone_and_batched(llama_dir, llm):
    params = [SamplingParams(max_tokens=64, temperature=1.0, seed=s, guided_regex=REGEX) for s in range(4)]
    prompts = _prompts(4, seed=2)
    batched = [o.token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    assert batched == alone


def test_guided_with_stop_string_cuts_at_the_stop(llm):
    outs = llm.generate(_prompts(), SamplingParams(max_tokens=64, temperature=1.0, seed=3, guided_regex=REGEX, stop=","))
    for o in outs:
        assert o.finish_reason == "stop"
        assert re.fullmatch(r"yes|no", o.text), o.text


def test_guided_logprobs_are_of_the_masked_distribution(llm):
    # the first token of "yes"/"no" is the byte "y" or "n": the constrained distribution has two
    # tokens, so the top-5 holds exactly those two and their probabilities sum to 1
    outs = llm.generate(_prompts(4), SamplingParams(max_tokens=8, temperature=1.0, seed=0, logprobs=5,
                                                    guided_choice=["yes", "no"]))
    y, n = (llm.tokenizer.encode(c, add_special_tokens=False)[0] for c in "yn")
    for o in outs:
        first = o.logprobs[0]
        assert {t for t, _ in first.top} == {y, n}
        assert math.isclose(sum(math.exp(v) for _, v in first.top), 1.0, rel_tol=1e-5)
        assert first.logprob == dict(first.top)[first.token_id]
        assert all(math.isfinite(lp.logprob) for lp in o.logprobs)
        # after the first byte the rest of the word is forced: probability 1
        assert all(abs(lp.logprob) < 1e-5 for lp in o.logprobs[1:])


def test_unguided_rows_are_untouched_by_the_mask(llama_dir, llm):
    prompts = _prompts(4, seed=4)
    plain = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    alone = [o.token_ids for o in llm.generate(prompts, plain)]
    mixed = llm.generate(prompts + prompts, [plain] * 4 + [SamplingParams(max_tokens=16, guided_regex=REGEX)] * 4)
    assert [o.token_ids for o in mixed[:4]] == alone


@pytest.mark.parametrize("kwargs, needle", [
    (dict(guided_regex="a(b"), "unclosed group"),
    (dict(guided_regex="[z-a]"), "guided_regex"),
    (dict(guided_json={"type": "objectx"}), "objectx"),
    (dict(guided_json="{not json"), "not valid JSON"),
    (dict(guided_json=["a"]), "JSON schema"),
    (dict(guided_choice=[]), "non-empty list"),
    (dict(guided_choice="yes"), "non-empty list"),
    (dict(guided_grammar="start: missing_rule"), "missing_rule"),
    (dict(guided_regex="a", guided_choice=["x"]), "only one of"),
    (dict(guided_regex="a", guided_json={"type": "object"}), "only one of"),
])
def test_invalid_grammar_is_a_value_error_naming_the_problem(kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        SamplingParams(**kwargs)


def test_missing_library_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # what `import` sees when it is not installed
    with pytest.raises(ImportError, match=r"llmopt\[guided\]"):
        guided_mod.check_spec.__wrapped__(GuidedSpec("regex", "x+"))


def test_equal_specs_share_one_compiled_grammar(llm):
    llm.generate(_prompts(2), SamplingParams(max_tokens=64, guided_json=SCHEMA))
    dec = llm.engine.guided_decoder()
    before = len(dec._compiled)
    reordered = dict(reversed(list(SCHEMA.items())))  # same schema, other key order
    llm.generate(_prompts(2), SamplingParams(max_tokens=64, guided_json=reordered))
    assert len(dec._compiled) == before


def test_apply_bitmask_sets_exactly_the_disallowed_logits_to_minus_inf():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 77, generator=g)
    words = torch.randint(-2**31, 2**31 - 1, (3, 3), generator=g, dtype=torch.int64).to(torch.int32)
    allowed = unpack_bitmask(words, 77)
    ref = [[bool((int(words[r, t // 32]) >> (t % 32)) & 1) for t in range(77)] for r in range(3)]
    assert allowed.tolist() == ref
    out = apply_bitmask(logits.clone(), words)
    assert torch.equal(out[allowed], logits[allowed])
    assert torch.all(out[~allowed] == float("-inf"))


# ---- the real model and tokenizer ------------------------------------------------------------
MATH = ["What is 17 * 23?", "Tom has 5 apples and buys 7 more. How many apples does he have?"]


@pytest.fixture(scope="module")
def smol():
    return LLM(SMOLLM2)


@pytest.mark.slow
@requires_smollm2
def test_real_model_guided_format_always_matches_the_competition_rule(smol):
    from llmopt.tasks.evaluate import guided_format_grammar

    chats = [[{"role": "user", "content": q}] for q in MATH]
    for sampling in (dict(temperature=0.0), dict(temperature=1.0, seed=2, top_p=0.9)):
        outs = smol.chat(chats, SamplingParams(max_tokens=96, guided_grammar=guided_format_grammar(96), **sampling))
        for o in outs:
            assert o.finish_reason == "stop", o.text
            assert parse_output(o.text).format_ok, o.text


@pytest.mark.slow
@requires_smollm2
def test_real_model_guided_json_parses_and_validates(smol):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    chats = [[{"role": "user", "content": f"Describe {who} as JSON with name and age."}]
             for who in ("a teacher", "an old sailor")]
    for sampling in (dict(temperature=0.0), dict(temperature=0.8, seed=3)):
        for o in smol.chat(chats, SamplingParams(max_tokens=60, guided_json=schema, **sampling)):
            assert o.finish_reason == "stop", o.text
            obj = json.loads(o.text)
            assert set(obj) == {"name", "age"} and isinstance(obj["name"], str) and len(obj["name"]) <= 20
            assert type(obj["age"]) is int and 0 <= obj["age"] <= 150


def test_eval_guided_config_decodes_with_the_format_grammar_and_rejects_too_few_tokens():
    from llmopt.tasks.evaluate import EvalConfig, _sampling_params, guided_format_grammar

    params = _sampling_params(EvalConfig(guided=True, max_tokens=256), 0)
    assert params.guided is not None and params.guided.kind == "grammar"
    assert params.guided_grammar == guided_format_grammar(256)
    assert _sampling_params(EvalConfig(max_tokens=256), 0).guided is None  # the default stays unguided
    with pytest.raises(ValueError, match="max_tokens >= 96"):
        EvalConfig(guided=True, max_tokens=50)


def test_random_model_under_the_eval_grammar_is_always_in_the_competition_format(llm):
    from llmopt.tasks.evaluate import guided_format_grammar

    # the tiny model picks bytes at random: only the grammar's token caps can end think and answer
    for seed in range(3):
        outs = llm.generate(_prompts(6), SamplingParams(max_tokens=120, temperature=1.0, seed=seed,
                                                        guided_grammar=guided_format_grammar(120)))
        for o in outs:
            assert o.finish_reason == "stop" and len(o.token_ids) <= 120
            assert parse_output(o.text).format_ok, o.text


def test_a_dead_grammar_state_gets_only_eos_so_the_sequence_ends(llm):
    dec = llm.engine.guided_decoder()
    st = dec.start(GuidedSpec("regex", "ab"))
    z = llm.tokenizer.encode("z", add_special_tokens=False)[0]
    assert not st.accept(z) and st.error  # a token the grammar forbids kills the state
    allowed = unpack_bitmask(dec.fill_bitmask([st]), dec.vocab_size)[0]
    assert set(torch.nonzero(allowed).flatten().tolist()) == set(llm.tokenizer.stop_token_ids)
