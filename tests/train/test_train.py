"""Training on tiny random models: gradients equal transformers', adapters merge exactly and refuse
another base model, checkpoints are complete or absent, SFT and GRPO run and resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmopt.config import ModelLoadError
from llmopt.models.adapter import AdapterMismatchError, load_adapter, merge_adapter, save_adapter
from llmopt.models.loader import load_model
from llmopt.train.common import (
    LoraSpec,
    RunLog,
    TrainConfigError,
    apply_lora,
    complete_checkpoints,
    export_adapter,
    latest_checkpoint,
    save_checkpoint,
    token_logprobs,
)
from llmopt.train.data import (
    CODE_TEMPLATES,
    EVAL_SEED_LIMIT,
    TRAIN_SEED_BASE,
    DatasetError,
    build_examples,
    check_eval_seed,
    code_examples,
    load_jsonl_examples,
    parse_suites,
)
from llmopt.train.grpo import GRPOConfig, GRPOTrainer, RolloutWeights, group_advantages, grpo_loss
from llmopt.train.rewards import Reward, RewardConfig, reward
from llmopt.train.sft import SFTConfig, run_sft


def _hf_grads(hf, ids):
    hf.zero_grad()
    out = hf(ids[None], labels=ids[None])
    out.loss.backward()
    return out.loss.item()


def _random_lora_b(peft_model, seed: int) -> None:
    """Random LoRA B matrices (PEFT starts them at 0): a LoRA model that differs from its base."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)


def test_our_decoder_gradients_match_transformers_llama(tiny_models):
    hf, hf_dir, _ = tiny_models["llama"]
    hf = hf.float().train()
    ours = load_model(hf_dir).model.train()
    for p in ours.parameters():
        p.requires_grad_(True)
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3))
    logits = ours.compute_logits(ours(ids, torch.arange(len(ids))))
    loss = torch.nn.functional.cross_entropy(logits[:-1], ids[1:])
    loss.backward()
    ref_loss = _hf_grads(hf, ids)
    assert abs(loss.item() - ref_loss) < 1e-5
    L = hf.model.layers[1]
    q = L.self_attn.q_proj.weight.grad.shape[0]
    k = L.self_attn.k_proj.weight.grad.shape[0]
    qkv = ours.layers[1].self_attn.qkv_proj.weight.grad
    # HF-dir llama weights are not permuted, so q/k/v rows line up
    pairs = [(qkv[:q], L.self_attn.q_proj.weight.grad), (qkv[q:q + k], L.self_attn.k_proj.weight.grad),
             (qkv[q + k:], L.self_attn.v_proj.weight.grad),
             (ours.layers[1].self_attn.o_proj.weight.grad, L.self_attn.o_proj.weight.grad),
             (ours.layers[0].mlp.down_proj.weight.grad, hf.model.layers[0].mlp.down_proj.weight.grad),
             (ours.layers[0].input_layernorm.weight.grad, hf.model.layers[0].input_layernorm.weight.grad),
             (ours.embed_tokens.weight.grad, hf.model.embed_tokens.weight.grad)]
    for a, b in pairs:
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()
    hf.zero_grad()
    hf.eval()


def test_lora_gradients_reach_only_the_adapter_and_native_ops_still_serve_inference(tiny_models):
    _, hf_dir, _ = tiny_models["llama"]
    net = load_model(hf_dir).model
    peft = apply_lora(net, LoraSpec(rank=4, alpha=8, first_layer=1))
    ids = list(range(5, 40))
    lp = token_logprobs(net, ids, 10)
    (-lp.mean()).backward()
    trained = {n for n, p in peft.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n and ".layers.1." in n for n in trained)
    with torch.no_grad():
        again = token_logprobs(net, ids, 10)
    assert torch.allclose(lp.detach(), again, atol=1e-5)


def test_adapter_export_merge_equals_the_lora_model_and_refuses_another_base(tiny_models, tmp_path):
    _, hf_dir, _ = tiny_models["llama"]
    net = load_model(hf_dir).model
    peft = apply_lora(net, LoraSpec(rank=4, alpha=8, first_layer=0))
    _random_lora_b(peft, 0)
    ids = list(range(3, 30))
    with torch.no_grad():
        want = token_logprobs(net, ids, 1)
    path = save_adapter(tmp_path / "a.safetensors", export_adapter(peft, "tiny-llama"), dtype=torch.float32)
    fresh = load_model(hf_dir).model
    assert merge_adapter(fresh, load_adapter(path)) == 2 * 4
    with torch.no_grad():
        got = token_logprobs(fresh, ids, 1)
    assert torch.allclose(want, got, atol=1e-4), (want - got).abs().max()
    other = load_model(tiny_models["qwen2"][1]).model
    with pytest.raises(AdapterMismatchError, match="trained on base model tiny-llama"):
        merge_adapter(other, load_adapter(path))
    # the same adapter given by path at load time: LLM(model, adapter=...) / load_model(adapter=...)
    with torch.no_grad():
        by_path = token_logprobs(load_model(hf_dir, adapter=path).model, ids, 1)
    assert torch.equal(by_path, got)
    from llmopt import LLM, SamplingParams

    llm = LLM(str(hf_dir), adapter=str(path), num_threads=1)
    assert torch.allclose(llm.engine.score(ids), got, atol=1e-4)
    assert len(llm.generate([ids[:5]], SamplingParams(max_tokens=3, temperature=0))[0].token_ids) == 3
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(hf_dir, adapter=tmp_path / "missing.safetensors")
    with pytest.raises(AdapterMismatchError):
        load_model(tiny_models["qwen2"][1], adapter=path)


def test_a_partial_checkpoint_never_loads_as_complete(tiny_models, tmp_path):
    _, hf_dir, _ = tiny_models["llama"]
    peft = apply_lora(load_model(hf_dir).model, LoraSpec(rank=2, alpha=4, first_layer=0))
    ad = export_adapter(peft, "tiny")
    save_checkpoint(tmp_path, 5, ad, {"optimizer": {}})
    # a kill during the next save leaves a temp dir, and a dir without its COMPLETE marker
    (tmp_path / "checkpoints" / "step-000010.tmp-999").mkdir()
    half = tmp_path / "checkpoints" / "step-000012"
    half.mkdir()
    (half / "adapter.safetensors").write_bytes(b"partial")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-000005"]
    assert latest_checkpoint(tmp_path)[1]["step"] == 5


def test_run_log_drops_records_newer_than_the_resumed_checkpoint(tmp_path):
    log = RunLog(tmp_path / "log.jsonl")
    for s in range(1, 8):
        log.write({"step": s})
    log.truncate_after(5)
    assert [r["step"] for r in log.records()] == [1, 2, 3, 4, 5]


def test_training_seeds_are_disjoint_from_evaluation_seeds():
    check_eval_seed(0)
    check_eval_seed(EVAL_SEED_LIMIT - 1)
    with pytest.raises(DatasetError):
        check_eval_seed(EVAL_SEED_LIMIT)
    # eval dataset seeds are seed*1000+t and (seed+7919)*1000+t for demos
    assert (EVAL_SEED_LIMIT + 7919) * 1000 + 1000 < TRAIN_SEED_BASE
    ex = build_examples({"math": 5, "logic": 6})
    from llmopt.tasks.mathlogic import logic_suite, math_suite

    eval_q = {it.messages[-1]["content"] for it in math_suite().items(50, 0) + logic_suite().items(60, 0)}
    assert not eval_q & {e.question for e in ex}


def test_gold_targets_pass_their_own_graders_and_are_in_format():
    from llmopt.reasoning.format import extract_answer

    ex = build_examples({"math": 10, "logic": 12, "code": len(CODE_TEMPLATES)})
    for e in ex:
        assert e.grade(extract_answer(e.target())).correct, e.id


def test_code_tasks_reject_wrong_code_and_are_not_humaneval():
    from llmopt.tasks.code import load_problems

    ex = code_examples(len(CODE_TEMPLATES))
    humaneval_names = {p["entry_point"] for p in load_problems().values()}
    e = ex[0]
    name = e.answer.split("(")[0].removeprefix("def ")
    assert not e.grade(f"def {name}(xs):\n    return xs\n").correct
    assert not e.grade("").correct
    assert e.grade(f"```python\n{e.answer}\n```").correct
    assert all(q.question not in {p["prompt"] for p in load_problems().values()} for q in ex)
    assert len({x.task for x in ex}) == len(CODE_TEMPLATES)
    assert humaneval_names  # loaded


def test_rewards_count_format_and_correctness_from_the_graders():
    ex = build_examples({"math": 5})[0]
    good = ex.target()
    r = reward(good, ex.grade, 20, 100)
    assert r.format_ok and r.correct and r.total == 1.5
    hedged = f"<think>\nhm\n</think>\n<answer>\n{ex.answer} or 7\n</answer>"
    r = reward(hedged, ex.grade, 20, 100)
    assert r.format_ok and not r.correct and r.total == 0.5
    r = reward(f"The answer is {ex.answer}", ex.grade, 20, 100)
    assert not r.format_ok and not r.correct and r.total == 0.0
    r = reward(good, ex.grade, 50, 100, RewardConfig(length_penalty=0.2))
    assert math.isclose(r.total, 1.5 - 0.1)


def test_group_advantages_and_clipped_loss():
    assert group_advantages([1.0, 1.0, 1.0]) == [0.0, 0.0, 0.0]
    a = group_advantages([0.0, 1.0])
    assert a[0] < 0 < a[1] and math.isclose(a[0], -a[1])
    new = torch.tensor([0.0, 0.5], requires_grad=True)
    old = torch.tensor([0.0, 0.0])
    loss, kl, frac = grpo_loss(new, old, None, 1.0, 0.2, 0.0)
    # token 2's ratio e^0.5 > 1.2 is clipped for a positive advantage: no gradient through it
    loss.backward()
    assert new.grad[1].item() == 0.0 and new.grad[0].item() < 0 and frac == 0.5 and kl == 0.0
    _, kl, _ = grpo_loss(torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-1.5]), 0.0, 0.2, 0.1)
    assert math.isclose(kl, math.exp(-0.5) + 0.5 - 1, rel_tol=1e-5)


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_jsonl_examples(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="empty"):
        load_jsonl_examples(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"question": "2+2"}\n')
    with pytest.raises(DatasetError, match="answer"):
        load_jsonl_examples(tmp_path / "bad.jsonl")
    with pytest.raises(DatasetError):
        parse_suites("math")
    with pytest.raises(DatasetError):
        build_examples({"poetry": 3})
    for bad in (dict(lr=0.0), dict(grad_accum=0), dict(targets="silver"), dict(systems="pirate")):
        with pytest.raises(TrainConfigError):
            SFTConfig(**bad).validate()
    for bad in (dict(group_size=1), dict(beta=-1.0), dict(clip_eps=1.5), dict(steps=0)):
        with pytest.raises(TrainConfigError):
            GRPOConfig(**bad).validate()


def test_sft_trains_checkpoints_and_resumes_where_it_stopped(tiny_models, tmp_path):
    _, hf_dir, _ = tiny_models["llama"]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(6)))
    cfg = SFTConfig(model=str(hf_dir), out=str(tmp_path / "run"), data=str(data), grad_accum=2, save_every=1,
                    lr=1e-2, max_seq_tokens=1000, lora=LoraSpec(rank=4, alpha=8, first_layer=0), systems="none")
    seen = []

    def stop_after_two(rec):
        seen.append(rec)
        if rec["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sft(cfg, progress=stop_after_two)
    assert latest_checkpoint(tmp_path / "run")[1]["step"] == 2
    out = run_sft(cfg, progress=seen.append)
    steps = [r["step"] for r in RunLog(tmp_path / "run" / "log.jsonl").records()]
    assert steps == [1, 2, 3]
    assert seen[-1]["loss"] < seen[0]["loss"]
    ad = load_adapter(out)
    assert ad.rank == 4 and json.loads(ad.recipe)["kind"] == "sft"
    # a resumed run with other settings is refused rather than mixed
    with pytest.raises(TrainConfigError, match="different"):
        run_sft(SFTConfig(**{**cfg.__dict__, "grad_accum": 3}))
    _report_draws_the_run(tmp_path / "run", tmp_path / "report", "sft", 3)


def test_grpo_rollouts_come_from_our_engine_with_the_policy_logprobs(tiny_models, tmp_path):
    _, hf_dir, _ = tiny_models["llama"]
    cfg = GRPOConfig(model=str(hf_dir), out=str(tmp_path / "g"), suites="math=4", steps=2, prompts_per_step=2,
                     group_size=3, max_new_tokens=12, lr=5e-2, beta=0.1, save_every=1, max_prompt_tokens=1000,
                     lora=LoraSpec(rank=4, alpha=8, first_layer=0), systems="none")

    def distinct_chars(text, ex, n):  # random weights never answer: a reward that varies in the group
        return Reward(len(set(text)) / 10, False, False, "test")

    tr = GRPOTrainer(cfg, reward_fn=distinct_chars)
    groups, gen = tr.rollouts(0)
    assert len(groups) == 2 and all(len(g) == 3 for g in groups)
    assert gen["cached_prompt_tokens"] > 0  # the group shares its prompt through the prefix cache
    r = groups[0][0]
    with torch.no_grad():
        lp = token_logprobs(tr.model, r.prompt_ids + r.token_ids, len(r.prompt_ids))
    assert torch.allclose(lp, torch.tensor(r.old_logprobs), atol=1e-4)
    assert len({tuple(x.token_ids) for x in groups[0]}) > 1  # per-request seeds differ
    assert gen["rollout_fused"] == 1.0  # decode steps ran the fused step on the packed rollout weights
    assert tr.engine.runner.fused is None  # and the LoRA modules, put back, run op by op
    before = tr.engine.score(r.prompt_ids + r.token_ids)
    upd = tr.update(groups)
    assert upd["trained_rollouts"] > 0
    after = tr.engine.score(r.prompt_ids + r.token_ids)
    assert not torch.allclose(before, after)  # the engine runs the updated policy
    # the same prompts again: the prefix cache holds the old policy's K/V, which must not be reused
    groups, gen = tr.rollouts(0)
    r = groups[1][2]
    with torch.no_grad():
        lp = token_logprobs(tr.model, r.prompt_ids + r.token_ids, len(r.prompt_ids))
    assert torch.allclose(lp, torch.tensor(r.old_logprobs), atol=1e-4)
    out = GRPOTrainer(cfg, reward_fn=distinct_chars).train()
    recs = RunLog(tmp_path / "g" / "log.jsonl").records()
    assert [x["step"] for x in recs] == [1, 2]
    assert {"reward", "format_rate", "accuracy", "kl", "rollout_tokens_per_s"} <= set(recs[0])
    assert load_adapter(out).rank == 4
    resumed = GRPOTrainer(GRPOConfig(**{**cfg.__dict__, "lr": 1e-3, "steps": 3}), reward_fn=distinct_chars)
    assert resumed.step == 2 and [g["lr"] for g in resumed.opt.param_groups] == [1e-3]  # --lr on resume is used
    _report_draws_the_run(tmp_path / "g", tmp_path / "report", "grpo", 2)


def test_rollout_weights_run_the_lora_policy_on_packed_projections_and_put_the_modules_back(tiny_models):
    """Inside ``policy()`` every projection is a packed fp32 copy (LoRA ones with the adapter merged
    in) computing what the LoRA model computes; on exit the same LoRA / Linear modules are back,
    base weights untouched; frozen projections are packed once, LoRA ones again on every entry."""
    from llmopt.kernels.dense import PackedLinear, native_available

    if not native_available():
        pytest.skip("native kernels are not built here")
    _, hf_dir, _ = tiny_models["llama"]
    model = load_model(hf_dir).model
    peft_model = apply_lora(model, LoraSpec(rank=4, alpha=8, first_layer=1))
    _random_lora_b(peft_model, 3)
    ids = list(range(3, 40))
    before = {name: model.get_submodule(name) for name in model.projection_names()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        want = token_logprobs(model, ids, 1)
    rw = RolloutWeights(model, peft_model)
    with torch.no_grad(), rw.policy():
        assert all(isinstance(model.get_submodule(name), PackedLinear) for name in before)
        got = token_logprobs(model, ids, 1)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert all(model.get_submodule(name) is mod for name, mod in before.items())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    frozen = dict(rw.frozen)
    assert set(frozen) == {f"layers.0.{p}" for p in model.PROJECTIONS} | {"lm_head"}
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)  # an optimizer step: the next entry packs the new policy
        want = token_logprobs(model, ids, 1)
        with rw.policy():
            got = token_logprobs(model, ids, 1)
            assert all(model.get_submodule(name) is frozen[name] for name in frozen)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_grpo_on_a_quantized_gguf_base_trains_float_projections(tiny_models, tmp_path):
    """A GGUF base runs on its own blocks for inference; the GRPO policy dequantizes it so LoRA can
    wrap the projections (PEFT cannot wrap a GGUF block linear)."""
    from gguf import GGMLQuantizationType

    from tests.conftest import write_gguf

    m, _, _ = tiny_models["llama"]
    path = write_gguf(m, tmp_path / "q8.gguf", qtype=GGMLQuantizationType.Q8_0)
    cfg = GRPOConfig(model=str(path), out=str(tmp_path / "g"), suites="math=2", steps=1, prompts_per_step=1,
                     group_size=2, max_new_tokens=8, beta=0.0, max_prompt_tokens=1000,
                     lora=LoraSpec(rank=2, alpha=4, first_layer=0), systems="none")
    tr = GRPOTrainer(cfg, reward_fn=lambda text, ex, n: Reward(float(len(text)), False, False, "test"))
    groups, _ = tr.rollouts(0)
    assert len(groups[0]) == 2
    assert tr.update(groups)["update_s"] >= 0


def test_cli_commands_take_an_adapter_and_refuse_a_missing_one(tiny_models, tmp_path):
    """`llmopt eval/run --adapter PATH` merge a trained adapter into any model; a wrong path is a
    clear error with a non-zero exit."""
    from typer.testing import CliRunner

    from llmopt.cli import app

    _, hf_dir, _ = tiny_models["llama"]
    peft = apply_lora(load_model(hf_dir).model, LoraSpec(rank=2, alpha=4, first_layer=0))
    path = save_adapter(tmp_path / "a.safetensors", export_adapter(peft, "tiny-llama"), dtype=torch.float32)
    out = tmp_path / "e.json"
    r = CliRunner().invoke(app, ["eval", str(hf_dir), "--adapter", str(path), "--suite", "math", "--n", "2",
                                 "--max-tokens", "4", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["config"]["adapter"] == str(path)
    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps({"id": "a", "questions": [{"id": 1, "content": "1+1?"}]}) + "\n")
    for cmd in (["eval", str(hf_dir), "--suite", "math", "--n", "1"],
                ["run", str(cases), "-o", str(tmp_path / "o.jsonl"), "--model", str(hf_dir)]):
        r = CliRunner().invoke(app, [*cmd, "--adapter", str(tmp_path / "missing.safetensors")])
        assert r.exit_code != 0 and "does not exist" in r.output, r.output


def test_grpo_from_an_sft_adapter_keeps_it_as_reference_and_ships_the_stack(tiny_models, tmp_path):
    """--init-adapter is merged into the base first: the LoRA-disabled model is the SFT policy (the
    KL reference), rollouts run the merged policy with the same log-probs as the LoRA forward and
    leave the base weights bit for bit, and the final adapter (ranks stacked) loads on the plain base."""
    from llmopt.models.adapter import base_fingerprint

    _, hf_dir, _ = tiny_models["llama"]
    sft = apply_lora(load_model(hf_dir).model, LoraSpec(rank=4, alpha=8, first_layer=0))
    _random_lora_b(sft, 1)
    init = save_adapter(tmp_path / "sft.safetensors", export_adapter(sft, "tiny-llama"), dtype=torch.float32)
    base_fp = base_fingerprint(load_model(hf_dir).model)
    ids = list(range(3, 30))
    with torch.no_grad():
        sft_lp = token_logprobs(load_model(hf_dir, adapter=init).model, ids, 1)

    cfg = GRPOConfig(model=str(hf_dir), out=str(tmp_path / "g"), init_adapter=str(init), suites="math=2", steps=1,
                     prompts_per_step=1, group_size=3, max_new_tokens=10, lr=5e-2, beta=0.1, max_prompt_tokens=1000,
                     lora=LoraSpec(rank=2, alpha=4, first_layer=1), systems="none")  # another layout on top
    tr = GRPOTrainer(cfg, reward_fn=lambda text, ex, n: Reward(len(set(text)) / 10, False, False, "test"))
    with torch.no_grad(), tr.peft_model.disable_adapter():
        assert torch.allclose(token_logprobs(tr.model, ids, 1), sft_lp, atol=1e-5)  # reference = SFT policy
    with torch.no_grad():
        for n, p in tr.peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a policy that differs from the reference
    weights = {n: p.detach().clone() for n, p in tr.model.named_parameters() if "lora_" not in n}
    groups, _ = tr.rollouts(0)
    assert all(torch.equal(p, weights[n]) for n, p in tr.model.named_parameters() if "lora_" not in n)
    r = groups[0][0]
    with torch.no_grad():
        lp = token_logprobs(tr.model, r.prompt_ids + r.token_ids, len(r.prompt_ids))
        ref = token_logprobs(tr.model, ids, 1)
    assert not torch.allclose(ref, sft_lp, atol=1e-3)  # the LoRA branch is back on after the rollouts
    assert torch.allclose(lp, torch.tensor(r.old_logprobs), atol=1e-4)

    final = load_adapter(tr.train())
    assert final.base_fingerprint == base_fp and final.scale == 1.0
    assert final.tensors["layers.0.mlp.down_proj"][0].shape[0] == 4  # SFT only
    assert final.tensors["layers.1.mlp.down_proj"][0].shape[0] == 4 + 2  # SFT and GRPO stacked
    with torch.no_grad():
        want = token_logprobs(tr.model, ids, 1)
        got = token_logprobs(load_model(hf_dir, adapter=tmp_path / "g" / "adapter.safetensors").model, ids, 1)
    assert torch.allclose(want, got, atol=1e-4), (want - got).abs().max()
    with pytest.raises(AdapterMismatchError):
        GRPOTrainer(GRPOConfig(**{**cfg.__dict__, "model": str(tiny_models["qwen2"][1]), "out": str(tmp_path / "q")}))


def _report_draws_the_run(run_dir, out_dir, kind, steps):
    """`llmopt report RUN_DIR` reads a training run directory: a table row and the curves."""
    from llmopt.report.build import build_report
    from llmopt.report.runs import load_runs

    runs = load_runs([run_dir])
    assert [(t.kind, len(t.records)) for t in runs.trainings] == [(kind, steps)]
    assert not runs.skipped  # config.json belongs to the run, not an unknown file
    files = build_report([run_dir], out_dir)
    assert [p.name for p in files.figures] == ["training_curves.png"]
    assert files.figures[0].stat().st_size > 10_000
    md = files.markdown.read_text()
    assert f"| {kind} {run_dir.name} | {kind} | {steps} |" in md
