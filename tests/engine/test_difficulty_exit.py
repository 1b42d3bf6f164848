"""Difficulty exit: the engine reads the prompt's last hidden state when it computes the prompt, the
difficulty probe gives P(wrong), and above ``difficulty_exit`` thinking is closed in place of the
``difficulty_exit_tokens``-th think token. The probe's P(wrong) is the one of the prompt's state computed
offline, whatever the batch, chunking or prefix cache; an exit that does not fire changes nothing."""

import math

import pytest
import torch

from llmopt import LLM, SamplingParams
from llmopt.config import EngineConfig
from llmopt.engine.engine import LLMEngine
from llmopt.models.registry import REGISTRY, probe_for
from llmopt.reasoning.difficulty import DifficultyProbe, auc, fit_probe
from llmopt.reasoning.format import format_ok
from tests.engine.reasoning_util import (
    OPEN_PROMPT,
    PLAIN_PROMPT,
    assert_batched_matches_single,
    plain_and_speculative,
    reasoning_params,
)

PROMPTS = [OPEN_PROMPT, "x<think>", "Why?\n<think>\n", OPEN_PROMPT + " then", "Count the legs.<think>"]


def _params(**kw):
    return reasoning_params(60, **kw)


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(str(tiny_models["llama"][1]), kv_cache_memory_gb=0.05, block_size=8)


def _probe(llm, bias: float, weight: torch.Tensor | None = None) -> DifficultyProbe:
    """A probe on the engine (a real one: P(wrong) = sigmoid(h . weight + bias))."""
    h = llm.engine.model_config.hidden_size
    probe = DifficultyProbe(torch.zeros(h) if weight is None else weight, bias, {"model": "tiny"})
    llm.engine.difficulty_probe = probe
    return probe


def _ids(llm, prompt: str) -> list[int]:
    return llm.engine.encode_prompt(prompt)[0]


def test_the_engine_reads_the_prompts_p_wrong_from_its_last_hidden_state(llm):
    """In one batch, through chunked prefill and from the prefix cache: the offline state's P(wrong)."""
    torch.manual_seed(0)
    probe = _probe(llm, 0.1, torch.randn(llm.engine.model_config.hidden_size) * 0.2)
    want = probe.p_wrong(llm.engine.prompt_states([_ids(llm, p) for p in PROMPTS])).tolist()
    assert max(want) - min(want) > 0.05  # the prompts get different estimates
    params = _params(max_tokens=4, difficulty_exit=0.999)
    for _ in range(2):  # the second time the prompts come from the prefix cache
        outs = llm.generate(PROMPTS, params)
        assert [o.reasoning.p_wrong for o in outs] == pytest.approx(want, abs=1e-4)
    long = OPEN_PROMPT * 12  # longer than the step's token budget: prefilled in chunks
    chunked = LLM(llm.engine.loaded.source.as_posix(), kv_cache_memory_gb=0.05, block_size=8,
                  max_num_batched_tokens=32)
    chunked.engine.difficulty_probe = probe
    assert len(_ids(chunked, long)) > 32
    out = chunked.generate([long], params)[0]
    assert out.reasoning.p_wrong == pytest.approx(probe.p_wrong(chunked.engine.prompt_states([_ids(chunked, long)])).item(),
                                                  abs=1e-4)


def test_requests_without_difficulty_exit_are_not_judged(llm):
    _probe(llm, 5.0)
    out = llm.generate([OPEN_PROMPT], _params(max_tokens=4))[0]
    assert out.reasoning.p_wrong is None


@pytest.mark.parametrize("k", [1, 5, 12])
@pytest.mark.parametrize("sampled", [False, True])
def test_a_hard_prompt_stops_thinking_in_place_of_its_kth_think_token(llm, k, sampled):
    kw = dict(temperature=0.9, seed=7) if sampled else {}
    _probe(llm, 4.0)  # P(wrong) = 0.982 for every prompt
    ref = llm.generate([OPEN_PROMPT], _params(**kw))[0]
    before = llm.engine.stats["difficulty_exits"]
    out = llm.generate([OPEN_PROMPT], _params(difficulty_exit=0.98, difficulty_exit_tokens=k, **kw))[0]
    close = llm.engine.close_ids
    r = out.reasoning
    assert r.closed_by == "difficulty" and r.think_tokens == k - 1 and r.phase == "answer"
    assert r.p_wrong == pytest.approx(1 / (1 + math.exp(-4.0)))
    assert out.token_ids[:k - 1] == ref.token_ids[:k - 1]  # the same thinking up to the exit
    assert out.token_ids[k - 1:k - 1 + len(close)] == close  # then the closing text instead of the k-th token
    assert format_ok("<think>" + out.text) or len(out.token_ids) == 60
    assert llm.engine.stats["difficulty_exits"] == before + 1


@pytest.mark.parametrize("p_bias, want", [(1.0, 7), (3.0, 3), (-1.0, None)])
def test_a_looser_second_tier_and_the_smaller_cap_wins(llm, p_bias, want):
    """P(wrong) 0.73: above the budget's 0.7, below the exit's 0.9: capped at the budget's 7; 0.95: above both,
    the exit's 3 wins; 0.27: neither applies."""
    _probe(llm, p_bias)
    ref = llm.generate([OPEN_PROMPT], _params())[0]
    out = llm.generate([OPEN_PROMPT], _params(difficulty_exit=0.9, difficulty_exit_tokens=3, difficulty_budget=7,
                                              difficulty_budget_threshold=0.7))[0]
    if want is None:
        assert out.token_ids == ref.token_ids and out.reasoning.closed_by != "difficulty"
        return
    assert out.reasoning.closed_by == "difficulty" and out.reasoning.think_tokens == want - 1
    assert out.token_ids[:want - 1] == ref.token_ids[:want - 1]
    assert out.token_ids[want - 1:want - 1 + len(llm.engine.close_ids)] == llm.engine.close_ids
    alone = llm.generate([OPEN_PROMPT], _params(difficulty_budget=7, difficulty_budget_threshold=0.7))[0]
    assert alone.reasoning.closed_by == ("difficulty" if p_bias > 0.85 else out.reasoning.closed_by)
    assert alone.reasoning.think_tokens == 6


@pytest.mark.parametrize("p_bias, want", [(4.0, 1), (2.5, 6)])
def test_a_stricter_second_tier_skips_thinking_for_the_hopeless(llm, p_bias, want):
    """The budget tier above the exit's threshold with fewer tokens: P(wrong) 0.982 is above both (0.97 -> 1
    token: thinking closed in place of the first think token, the answer follows in the format); 0.924 only
    above the exit's 0.9 (6 tokens)."""
    _probe(llm, p_bias)
    ref = llm.generate([OPEN_PROMPT], _params())[0]
    out = llm.generate([OPEN_PROMPT], _params(difficulty_exit=0.9, difficulty_exit_tokens=6, difficulty_budget=1,
                                              difficulty_budget_threshold=0.97))[0]
    close = llm.engine.close_ids
    assert out.reasoning.closed_by == "difficulty" and out.reasoning.think_tokens == want - 1
    assert out.token_ids[:want - 1] == ref.token_ids[:want - 1]
    assert out.token_ids[want - 1:want - 1 + len(close)] == close
    assert format_ok("<think>" + out.text) or len(out.token_ids) == 60


def test_an_easy_prompt_thinks_on_and_nothing_changes(llm):
    _probe(llm, 4.0)
    ref = llm.generate([OPEN_PROMPT], _params())[0]
    out = llm.generate([OPEN_PROMPT], _params(difficulty_exit=0.99, difficulty_exit_tokens=3))[0]  # 0.982 < 0.99
    assert out.token_ids == ref.token_ids and out.reasoning.closed_by != "difficulty"


def test_the_threshold_splits_prompts_by_their_own_estimate(llm):
    torch.manual_seed(1)
    probe = _probe(llm, 0.0, torch.randn(llm.engine.model_config.hidden_size) * 0.2)
    p = probe.p_wrong(llm.engine.prompt_states([_ids(llm, x) for x in PROMPTS])).tolist()
    t = sorted(p)[len(p) // 2]  # the median: prompts above it are cut, the others are not
    outs = llm.generate(PROMPTS, _params(difficulty_exit=t, difficulty_exit_tokens=4))
    assert [o.reasoning.closed_by == "difficulty" for o in outs] == [x > t for x in p]
    assert sum(x > t for x in p) >= 1


def test_tokens_before_think_opens_do_not_count(llm):
    """Without <think> in the prompt the count starts after the model's own <think>; an output that never
    thinks is left alone."""
    _probe(llm, 4.0)
    ref = llm.generate([PLAIN_PROMPT], _params())[0]
    out = llm.generate([PLAIN_PROMPT], _params(difficulty_exit=0.5, difficulty_exit_tokens=3))[0]
    if ref.reasoning.phase == "none":
        assert out.token_ids == ref.token_ids and out.reasoning.closed_by is None
    else:
        assert out.reasoning.closed_by == "difficulty"


def test_batched_difficulty_exit_matches_single(llm):
    torch.manual_seed(2)
    probe = _probe(llm, 0.0, torch.randn(llm.engine.model_config.hidden_size) * 0.2)
    p = probe.p_wrong(llm.engine.prompt_states([_ids(llm, x) for x in PROMPTS])).tolist()
    params = [_params(difficulty_exit=min(0.999, max(0.001, x - 0.01 if i % 2 == 0 else x + 0.01)),
                      difficulty_exit_tokens=3 + i, answer_budget=8 if i % 3 == 0 else None, jump_forward=i == 1,
                      think_gate=30 if i == 4 else None, difficulty_budget=12 if i == 1 else None,
                      difficulty_budget_threshold=min(0.999, max(0.001, x - 0.02)))
              for i, x in enumerate(p)]
    assert_batched_matches_single(llm, PROMPTS, params, "difficulty", 2)


def test_speculative_decoding_exits_where_plain_decoding_does(tiny_models):
    plain, spec = plain_and_speculative(tiny_models)
    for e in (plain, spec):
        _probe(e, 4.0)
    for prompt in (OPEN_PROMPT, "x<think>"):
        for k in (3, 40, 70):
            p = _params(max_tokens=120, difficulty_exit=0.9, difficulty_exit_tokens=k)
            a, b = plain.generate([prompt], p)[0], spec.generate([prompt], p)[0]
            assert b.token_ids == a.token_ids and b.reasoning.closed_by == a.reasoning.closed_by == "difficulty"
    assert spec.engine.stats["spec_accepted_tokens"] > 0


def test_a_request_needs_a_probe(tiny_models):
    llm = LLM(str(tiny_models["llama"][1]), kv_cache_memory_gb=0.05, block_size=8)
    assert llm.engine.difficulty_probe is None  # a plain path ships none
    for kw in (dict(difficulty_exit=0.9), dict(difficulty_budget=32)):
        with pytest.raises(ValueError, match="llmopt train probe"):
            llm.generate([OPEN_PROMPT], _params(**kw))
    assert llm.engine.block_manager.num_used_blocks == 0 and not llm.engine.has_unfinished()


def test_a_probe_file_is_loaded_by_the_engine_config(tiny_models, tmp_path):
    path = str(tiny_models["llama"][1])
    ref = LLM(path, kv_cache_memory_gb=0.05, block_size=8)
    h = ref.engine.model_config.hidden_size
    DifficultyProbe(torch.zeros(h), 4.0, {"model": "tiny"}).save(tmp_path / "p.safetensors")
    llm = LLM(path, kv_cache_memory_gb=0.05, block_size=8, difficulty_probe=str(tmp_path / "p.safetensors"))
    assert llm.engine.difficulty_probe.bias == 4.0 and llm.engine.difficulty_probe.meta == {"model": "tiny"}
    out = llm.generate([OPEN_PROMPT], _params(difficulty_exit=0.9, difficulty_exit_tokens=2))[0]
    assert out.reasoning.closed_by == "difficulty"


def test_bad_probe_files_are_refused_with_what_to_do(tiny_models, tmp_path):
    from safetensors.torch import save_file

    path = str(tiny_models["llama"][1])
    with pytest.raises(ValueError, match="does not exist.*llmopt train probe"):
        LLMEngine(path, EngineConfig(kv_cache_memory_gb=0.05, difficulty_probe=str(tmp_path / "missing.safetensors")))
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a difficulty probe file"):
        LLMEngine(path, EngineConfig(kv_cache_memory_gb=0.05, difficulty_probe=str(tmp_path / "junk.safetensors")))
    save_file({"weight": torch.zeros(8), "bias": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="is not a difficulty probe"):
        LLMEngine(path, EngineConfig(kv_cache_memory_gb=0.05, difficulty_probe=str(tmp_path / "foreign.safetensors")))
    DifficultyProbe(torch.zeros(7), 0.0, {"model": "other"}).save(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="hidden states of size 7.*'other'.*train one"):
        LLMEngine(path, EngineConfig(kv_cache_memory_gb=0.05, difficulty_probe=str(tmp_path / "other.safetensors")))
    DifficultyProbe(torch.full((4,), float("nan")), 0.0).save(tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="finite"):
        DifficultyProbe.load(tmp_path / "nan.safetensors")


@pytest.mark.parametrize("value", [0, 0.0, 1, 1.0, 1.5, -0.2, True, "0.3"])
def test_bad_thresholds_are_value_errors(value):
    with pytest.raises(ValueError, match="difficulty_exit must be a probability"):
        SamplingParams(difficulty_exit=value)


@pytest.mark.parametrize("kw, match", [(dict(difficulty_budget=0), "difficulty_budget must"),
                                       (dict(difficulty_budget=True), "difficulty_budget must"),
                                       (dict(difficulty_budget=8, difficulty_budget_threshold=1.0),
                                        "difficulty_budget_threshold"),
                                       (dict(difficulty_budget=8, difficulty_budget_threshold=0), "difficulty_budget_threshold")])
def test_bad_difficulty_budgets_are_value_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "8"])
def test_bad_token_counts_are_value_errors(value):
    with pytest.raises(ValueError, match="difficulty_exit_tokens"):
        SamplingParams(difficulty_exit=0.9, difficulty_exit_tokens=value)


@pytest.mark.parametrize("kw", [dict(difficulty_exit=0.9), dict(difficulty_budget=32)])
def test_difficulty_exit_cannot_be_combined_with_guided_decoding(kw):
    with pytest.raises(ValueError, match="difficulty_budget cannot be combined with guided decoding"):
        SamplingParams(guided_choice=["a", "b"], **kw)


def test_a_saved_probe_loads_as_it_was(tmp_path):
    torch.manual_seed(3)
    probe = DifficultyProbe(torch.randn(16), -0.25, {"seeds": [1, 2], "model": "m"})
    back = DifficultyProbe.load(probe.save(tmp_path / "sub" / "p.safetensors"))
    assert torch.equal(back.weight, probe.weight) and back.bias == probe.bias and back.meta == probe.meta
    x = torch.randn(5, 16)
    assert torch.allclose(back.p_wrong(x), torch.sigmoid(x @ probe.weight - 0.25))
    with pytest.raises(ValueError, match="size 16"):
        back.p_wrong(torch.randn(5, 8))


def test_fit_probe_learns_a_direction_and_folds_the_standardization():
    """Separable up to noise along one direction, features on different scales and offsets: held-out
    AUC near 1; the folded weights give the standardized model's probabilities."""
    g = torch.Generator().manual_seed(4)
    n, d = 400, 12
    scale, offset = torch.rand(d, generator=g) * 10 + 0.1, torch.randn(d, generator=g) * 5
    z = torch.randn(2 * n, d, generator=g)
    y = (z[:, 3] + 0.3 * torch.randn(2 * n, generator=g) > 0).long()
    x = z * scale + offset
    probe = fit_probe(x[:n], y[:n], l2=1.0, meta={"seeds": [7]})
    assert auc(probe.p_wrong(x[n:]), y[n:]) > 0.95
    assert probe.meta == {"seeds": [7], "l2": 1.0, "examples": n}
    mu, sd = x[:n].double().mean(0), x[:n].double().std(0) + 1e-6
    w_std = probe.weight.double() * sd  # back to the standardized model's weights
    b_std = probe.bias + float((mu * probe.weight.double()).sum())
    direct = torch.sigmoid(((x[n:].double() - mu) / sd) @ w_std + b_std)
    assert torch.allclose(probe.p_wrong(x[n:]).double(), direct, atol=1e-5)
    with pytest.raises(ValueError, match="both right"):
        fit_probe(x[:10], torch.ones(10, dtype=torch.long))


def test_auc_counts_ties_half_and_needs_both_labels():
    assert auc(torch.tensor([0.9, 0.1, 0.5, 0.5]), torch.tensor([1, 0, 1, 0])) == pytest.approx(0.875)
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))


def test_the_reasoning_model_ships_a_probe_for_its_own_weights():
    """The registry's probe file exists, says which seeds trained it and reads the model's hidden size
    (SmolLM2-135M: 576); loading it needs no model."""
    path = probe_for("smollm2-135m-reasoning")
    assert path is not None and path == REGISTRY["smollm2-135m-reasoning"].probe_path()
    probe = DifficultyProbe.load(path)
    assert probe.hidden_size == 576 and probe.meta["model"] == "smollm2-135m-reasoning"
    assert len(probe.meta["seeds"]) >= 4 and probe.meta["think_tokens"] == 24
    assert min(probe.meta["auc_left_out"].values()) > 0.8
    assert probe_for("smollm2-135m-instruct") is None


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_the_state_the_engine_judges_is_transformers_last_hidden_state(tiny_models, arch, source):
    """The probe's feature is the final-norm hidden state at the prompt's last token: the engine's (read at
    prefill, several prompts in one step) gives the P(wrong) of transformers' ``last_hidden_state`` on the
    same weights, for every architecture and for the HF directory and the GGUF file alike."""
    hf, hf_dir, gguf_path = tiny_models[arch]
    llm = LLM(str(hf_dir if source == "hf" else gguf_path), quant="fp32" if source == "gguf" else None,
              kv_cache_memory_gb=0.05, block_size=8)
    torch.manual_seed(5)
    probe = _probe(llm, 0.2, torch.randn(llm.engine.model_config.hidden_size) * 0.3)
    prompts = [[3, 17, 29, 5, 8], [11, 2, 40, 7, 19, 23, 4, 9, 31], [6, 6]]
    with torch.no_grad():
        want = [probe.p_wrong(hf.model(torch.tensor([p])).last_hidden_state[0, -1:].float()).item() for p in prompts]
    outs = llm.generate(prompts, _params(max_tokens=2, difficulty_exit=0.5))
    assert [o.reasoning.p_wrong for o in outs] == pytest.approx(want, abs=1e-4)
