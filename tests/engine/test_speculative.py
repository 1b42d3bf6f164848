"""Speculative decoding by n-gram lookup (engine/speculative.py): drafts from the sequence's own tokens,
verified in the step. Greedy outputs are token for token those without speculation (whatever the
drafts: right ones are kept, wrong ones dropped), on every architecture, GGUF blocks and packed fp32,
next to budgets, stop strings, max_tokens, preemption and sampled requests."""

from __future__ import annotations

import pytest

from llmopt import SamplingParams
from llmopt.config import EngineConfig
from llmopt.engine import speculative
from llmopt.engine.engine import LLMEngine
from llmopt.engine.speculative import AcceptanceStats, NgramIndex, allot
from tests.conftest import ARCHS, random_prompts, requires_smollm2


# ---- the proposer -------------------------------------------------------------------------------
def test_lookup_takes_the_longest_suffix_match_and_its_most_recent_occurrence():
    idx = NgramIndex(1, 3)
    toks = [1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3]
    # suffix [5, 2, 3] never occurred; [2, 3] last occurred at 5..6, followed by 7, 5, 2
    assert idx.propose(toks, 3) == ([7, 5, 2], 2)
    toks += [7]  # now [2, 3, 7] occurred before (5..7): followed by 5, 2, 3, 7
    assert idx.propose(toks, 8) == ([5, 2, 3, 7], 3)


def test_lookup_without_a_match_proposes_nothing_and_respects_the_minimum():
    assert NgramIndex(1, 3).propose([1, 2, 3, 4], 4) == ([], 0)
    assert NgramIndex(2, 3).propose([1, 2, 9, 2], 4) == ([], 0)  # only a 1-gram repeats
    assert NgramIndex(1, 3).propose([1, 2, 9, 2], 4) == ([9, 2], 1)


def test_the_incremental_index_equals_a_fresh_one():
    toks = random_prompts(1, 3, 300, 301)[0]
    toks = [t % 7 for t in toks]  # plenty of repeats
    grown = NgramIndex(1, 4)
    for end in range(2, len(toks)):
        fresh = NgramIndex(1, 4)
        assert grown.propose(toks[:end], 5) == fresh.propose(toks[:end], 5)


def test_allot_hands_out_likely_drafts_first_within_the_row_cap():
    chances = [[0.9, 0.5, 0.2], [0.6, 0.55], [0.3]]
    assert allot(chances, rows=100, base_rows=3, row_cost=0.0) == [3, 2, 1]  # free rows: everything
    assert allot(chances, rows=5, base_rows=3, row_cost=0.0) == [1, 1, 0]  # two rows: the two likeliest
    assert allot(chances, rows=100, base_rows=3, row_cost=10.0) == [0, 0, 0]  # rows too dear: nothing
    got = allot(chances, rows=100, base_rows=3, row_cost=0.2)
    # one row at a time (no tile cost): p >= tokens * 0.2 / cost decides; 0.3 and 0.2 do not pay
    assert got == [2, 2, 0]
    for n, ps in zip(got, chances):
        assert n <= len(ps)


def test_allot_fills_the_last_register_tile_and_opens_a_new_one_only_for_enough_tokens():
    step = speculative.step_cost
    assert step(4, 0.1, 0.3, 4) == pytest.approx(1.7) and step(5, 0.1, 0.3, 4) == pytest.approx(2.1)
    # 3 decode rows: the tile has one free row, which the likeliest draft takes; a new tile for 4 more
    # must bring >= tokens * (0.3 + 0.4) / cost = 3.9 * 0.7 / 1.7 = 1.61 expected tokens
    assert allot([[0.9, 0.5, 0.2], [0.6, 0.55], [0.3]], rows=100, base_rows=3, row_cost=0.1,
                 tile_cost=0.3) == [2, 2, 1]  # 0.6 + 0.55 + 0.5 + 0.3 = 1.95: it pays
    assert allot([[0.9, 0.4, 0.2], [0.45, 0.35], [0.3]], rows=100, base_rows=3, row_cost=0.1,
                 tile_cost=0.3) == [1, 0, 0]  # 0.45 + 0.4 + 0.35 + 0.3 = 1.5: it does not
    # one decode row: three free rows in its tile, each cheap
    assert allot([[0.5, 0.3, 0.15]], rows=100, base_rows=1, row_cost=0.1, tile_cost=0.3) == [3]
    assert allot([[0.5, 0.3, 0.1]], rows=100, base_rows=1, row_cost=0.1, tile_cost=0.3) == [2]  # 0.1 < 1.8 * 0.1 / 1.6
    # a full tile of decode rows: drafts only as a whole new tile, and only when likely enough
    assert allot([[0.95, 0.9], [0.9, 0.85]], rows=100, base_rows=4, row_cost=0.1, tile_cost=0.3) == [2, 2]
    assert allot([[0.5, 0.3], [0.4, 0.3]], rows=100, base_rows=4, row_cost=0.1, tile_cost=0.3) == [0, 0]


def test_acceptance_stats_follow_what_was_kept():
    st = AcceptanceStats(n_max=3, k_max=2)
    before = st.chances(2, 2)
    for _ in range(50):
        st.record(2, drafts=2, kept=0, mismatched=True)  # the first draft is always wrong
    after = st.chances(2, 2)
    assert after[0] < before[0] / 3 and after[1] <= after[0]
    n1 = st.chances(1, 1)
    st.record(1, drafts=2, kept=1, mismatched=False)  # stopped for another reason: draft 2 not judged
    assert st.tried[1][2] == AcceptanceStats.PRIOR_TRIES and st.chances(1, 1)[0] > n1[0]


@pytest.mark.parametrize("kw, match", [
    (dict(speculative="medusa"), "speculative must be one of"),
    (dict(num_speculative_tokens=0), "num_speculative_tokens"),
    (dict(prompt_lookup_min=3, prompt_lookup_max=2), "prompt_lookup"),
    (dict(spec_max_rows=1), "spec_max_rows"),
    (dict(spec_row_cost=-1.0), "spec_row_cost"),
    (dict(spec_tile_cost=11.0), "spec_tile_cost"),
    (dict(spec_tile_rows=0), "spec_tile_rows"),
    (dict(spec_max_batch=0), "spec_max_batch"),
])
def test_bad_speculative_settings_are_value_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kw)


# ---- the engine -----------------------------------------------------------------------------------
def _engine(path, spec: bool, quant: str | None = None, **kw) -> LLMEngine:
    cfg = dict(num_threads=1, num_kv_blocks=kw.pop("num_kv_blocks", 128), block_size=16,
               speculative="ngram" if spec else None, spec_row_cost=0.0, spec_tile_cost=0.0,
               spec_max_batch=kw.pop("spec_max_batch", 64), **kw)
    return LLMEngine(str(path), EngineConfig(**cfg), quant=quant)


def _prompts() -> list[list[int]]:
    """Random prompts with a repeated stretch (so the lookup has something to propose)."""
    out = []
    for p in random_prompts(6, 11, 8, 30):
        out.append(p + p[: len(p) // 2] + p)
    return out


def _greedy(eng: LLMEngine, prompts, **kw) -> list[list[int]]:
    sp = SamplingParams(temperature=0.0, max_tokens=kw.pop("max_tokens", 40), **kw)
    return [o.token_ids for o in eng.generate(prompts, sp)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", ["gguf", "hf", "q8_0", "q4_1"])
def test_speculative_greedy_output_equals_plain_greedy(tiny_models, arch, fmt):
    """gguf: the tiny file's F32 tensors (packed fp32); hf: the directory (packed fp32); q8_0 / q4_1: GGUF
    blocks quantized on load (the GGUF kernels, int8 activations for generated rows)."""
    _, hf_dir, gguf_path = tiny_models[arch]
    path = gguf_path if fmt == "gguf" else hf_dir
    quant = fmt if fmt.startswith("q") else None
    prompts = _prompts()
    want = _greedy(_engine(path, False, quant), prompts)
    eng = _engine(path, True, quant)
    assert _greedy(eng, prompts) == want
    assert eng.stats["spec_draft_tokens"] > 0


@pytest.fixture
def oracle(monkeypatch):
    """Replace the lookup by a proposer that drafts from a given continuation per prompt (right
    drafts) or the wrong tokens (every draft off by one)."""
    state: dict = {"outputs": {}, "wrong": False}

    def propose(self, tokens, k):
        for prompt, out in state["outputs"].items():
            n = len(prompt)
            if tuple(tokens[:n]) == prompt:
                nxt = out[len(tokens) - n:len(tokens) - n + k]
                return ([(t + 1) % 256 for t in nxt] if state["wrong"] else nxt), 4
        return [], 0

    monkeypatch.setattr(speculative.NgramIndex, "propose", propose)
    return state


@pytest.mark.parametrize("wrong", [False, True])
def test_right_drafts_are_all_kept_and_wrong_ones_all_dropped(tiny_models, oracle, wrong):
    path = tiny_models["llama"][2]
    prompts = random_prompts(4, 5, 10, 40)
    want = _greedy(_engine(path, False), prompts, max_tokens=30)
    oracle["outputs"] = {tuple(p): w for p, w in zip(prompts, want)}
    oracle["wrong"] = wrong
    eng = _engine(path, True, num_speculative_tokens=4)
    assert _greedy(eng, prompts, max_tokens=30) == want
    st = eng.stats
    assert st["spec_draft_tokens"] > 0
    if wrong:
        assert st["spec_accepted_tokens"] == 0
    else:
        assert st["spec_accepted_tokens"] == st["spec_draft_tokens"]
        assert st["steps"] < 30  # up to 5 tokens a step instead of 1: far fewer steps than tokens


def test_drafts_never_run_past_max_tokens_or_a_stop_string(tiny_models, oracle):
    path = tiny_models["qwen2"][2]
    prompts = random_prompts(3, 8, 10, 30)
    eng0 = _engine(path, False)
    full = _greedy(eng0, prompts, max_tokens=30)
    oracle["outputs"] = {tuple(p): w for p, w in zip(prompts, full)}
    for mt in (1, 2, 7):  # max_tokens cuts inside a chunk of kept drafts
        assert _greedy(_engine(path, True, num_speculative_tokens=6), prompts, max_tokens=mt) == [w[:mt] for w in full]
    stop = eng0.tokenizer.decode(full[0][5:7])
    if stop.strip():
        sp = dict(max_tokens=30, stop=[stop])
        outs0 = eng0.generate(prompts, SamplingParams(temperature=0.0, **sp))
        outs1 = _engine(path, True, num_speculative_tokens=6).generate(prompts, SamplingParams(temperature=0.0, **sp))
        assert [o.text for o in outs1] == [o.text for o in outs0]
        assert [o.finish_reason for o in outs1] == [o.finish_reason for o in outs0]


def test_think_budget_and_jump_forward_steer_a_speculating_sequence_as_a_plain_one(tiny_models, oracle):
    path = tiny_models["llama"][2]
    eng0 = _engine(path, False)
    opener = eng0.tokenizer.encode("<think>\n", add_special_tokens=False)
    prompts = [p + opener for p in random_prompts(3, 21, 10, 30)]
    # (a byte-level vocabulary: the engine's closing text alone is 18 tokens)
    sp = dict(max_tokens=80, think_budget=12, jump_forward=True, loop_exit=True, answer_budget=30)
    want = _greedy(eng0, prompts, **sp)
    # drafts from the unsteered continuation: they run past the budget, where the engine writes its own text
    oracle["outputs"] = {tuple(p): w for p, w in zip(prompts, _greedy(_engine(path, False), prompts, max_tokens=80))}
    eng = _engine(path, True, num_speculative_tokens=8)
    got = eng.generate(prompts, SamplingParams(temperature=0.0, **sp))
    assert [o.token_ids for o in got] == want
    assert all(o.reasoning.think_tokens <= 12 for o in got)
    assert any(o.reasoning.closed_by == "budget" for o in got)
    assert 0 < eng.stats["spec_accepted_tokens"] < eng.stats["spec_draft_tokens"]


def test_preemption_and_sampled_requests_are_unaffected(tiny_models):
    path = tiny_models["qwen3"][2]
    prompts = _prompts()
    # few blocks: sequences are preempted and recomputed while they speculate
    want = _greedy(_engine(path, False, num_kv_blocks=12), prompts, max_tokens=48)
    eng = _engine(path, True, num_kv_blocks=12)
    assert _greedy(eng, prompts, max_tokens=48) == want
    assert eng.scheduler.num_preemptions > 0
    sp = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=24)
    plain = [o.token_ids for o in _engine(path, False).generate(prompts, sp)]
    eng = _engine(path, True)
    assert [o.token_ids for o in eng.generate(prompts, sp)] == plain
    assert eng.stats["spec_draft_tokens"] == 0  # sampled requests do not draft


@requires_smollm2
def test_speculative_decoding_on_the_embedded_model_keeps_its_greedy_tokens():
    from tests.conftest import smollm2_path

    path = smollm2_path()
    msgs = [[{"role": "user", "content": "Repeat this list twice: apple, banana, cherry, date, elderberry."}],
            [{"role": "user", "content": "Count the legs: 3 cows, 2 chickens, 1 spider. Show each step."}]]
    outs = {}
    for spec in (False, True):
        eng = LLMEngine(str(path), EngineConfig(num_threads=2, speculative="ngram" if spec else None))
        outs[spec] = [o.token_ids for o in eng.generate(msgs, SamplingParams(temperature=0.0, max_tokens=64))]
        if spec:
            assert eng.stats["spec_accepted_tokens"] > 0
            assert eng.stats["steps"] < sum(len(o) for o in outs[spec])
    assert outs[True] == outs[False]


def test_llmopt_run_speculates_by_default_with_the_same_answers(tiny_models, tmp_path):
    import json

    from typer.testing import CliRunner

    from llmopt.cli import app

    cases = tmp_path / "cases.jsonl"
    qs = [{"id": i, "content": "alpha beta gamma alpha beta gamma alpha beta"} for i in range(3)]
    cases.write_text(json.dumps({"id": "c", "concurrency": 2, "max_tokens": 24, "questions": qs}) + "\n")
    contents = {}
    for flag in ([], ["--speculative", "off"]):
        out = tmp_path / f"out{len(flag)}.jsonl"
        r = CliRunner().invoke(app, ["run", str(cases), "-o", str(out), "--model", str(tiny_models["llama"][2]),
                                     "--threads", "1", *flag])
        assert r.exit_code == 0, r.output
        contents[len(flag)] = [x["content"] for x in json.loads(out.read_text())["result"]["results"]]
    assert contents[0] == contents[2]
    r = CliRunner().invoke(app, ["run", str(cases), "-o", str(tmp_path / "bad.jsonl"), "--speculative", "medusa"])
    assert r.exit_code != 0 and "--speculative must be one of ngram or off" in r.output
    assert not (tmp_path / "bad.jsonl").exists()


def test_no_drafts_while_more_sequences_run_than_spec_max_batch(tiny_models):
    path = tiny_models["llama"][1]
    prompts = _prompts()
    eng = _engine(path, True, spec_max_batch=len(prompts) - 1)
    eng.add_request(prompts[0], SamplingParams(temperature=0.0, max_tokens=8))
    for p in prompts[1:]:
        eng.add_request(p, SamplingParams(temperature=0.0, max_tokens=8))
    eng.step()  # every prompt prefilled: all sequences run
    before = eng.stats["spec_draft_tokens"]
    eng.step()
    assert eng.stats["spec_draft_tokens"] == before  # one too many running: nobody drafts
    solo = _engine(path, True, spec_max_batch=1)
    solo.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=24))
    assert solo.stats["spec_draft_tokens"] > 0
