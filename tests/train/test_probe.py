"""``llmopt train probe``: answers generated and graded per seed (kept for a rerun), the fit, its
leave-one-seed-out AUC, and what a probe that cannot be fitted says."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from llmopt.reasoning.difficulty import DifficultyProbe
from llmopt.tasks.evaluate import EvalConfig, build_items
from llmopt.train.probe import ProbeConfig, examples, records_files, run_probe


def _planted(cfg: ProbeConfig, hidden: int) -> dict[int, torch.Tensor]:
    """Records and states for every seed in ``cfg``'s records dir: wrong answers lie along one direction of
    the states, a few right answers end before the label's token count (they are not examples)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for seed in cfg.seeds:
        items = build_items(EvalConfig(model=cfg.model, suites=cfg.suites, n=cfg.n, seed=seed))
        total = sum(len(v) for v in items.values())
        wrong = torch.arange(total) % 2 == 1
        states = torch.randn(total, hidden, generator=g)
        states[:, 5] += torch.where(wrong, 2.0, -2.0)
        recs = [{"seed": seed, "suite": "math", "task": None, "correct": not bool(w),
                 "think_tokens": 10 if i % 4 == 0 else 40, "output_tokens": 50, "text": ""}
                for i, w in enumerate(wrong.tolist())]
        rec_file, state_file = records_files(cfg, seed)
        rec_file.parent.mkdir(parents=True, exist_ok=True)
        rec_file.write_text("".join(json.dumps(r) + "\n" for r in recs))
        torch.save(states, state_file)
        out[seed] = states
    return out


def test_examples_are_the_outputs_still_thinking_labelled_wrong():
    recs = [{"think_tokens": 30, "correct": True}, {"think_tokens": 24, "correct": False},
            {"think_tokens": 100, "correct": False}, {"think_tokens": 0, "correct": True}]
    x, y = examples(recs, torch.arange(8.0).reshape(4, 2), 24)
    assert x.tolist() == [[0.0, 1.0], [4.0, 5.0]] and y.tolist() == [0, 1]


def test_a_probe_is_fitted_on_kept_answers_with_leave_one_seed_out_aucs(tiny_models, tmp_path):
    model = str(tiny_models["llama"][1])
    cfg = ProbeConfig(model=model, out=str(tmp_path / "p.safetensors"), seeds=(1, 2, 3), suites=("math", "logic"), n=20,
                      num_threads=1)
    hidden = 16
    _planted(cfg, hidden)  # kept answers: no generation
    path, summary = run_probe(cfg)
    probe = DifficultyProbe.load(path)
    assert probe.hidden_size == hidden and probe.meta["seeds"] == [1, 2, 3] and probe.meta["think_tokens"] == 24
    assert set(summary["seeds"]) == {1, 2, 3}
    for row in summary["seeds"].values():
        assert row["items"] == 40 and row["examples"] == 30 and row["wrong"] == 20
        assert row["auc_left_out"] > 0.9  # the planted direction is found on the seed left out
    assert summary["auc_train"] > 0.95 and probe.meta["auc_left_out"] == {str(s): v for s, v in
                                                                           summary["auc_left_out"].items()}


def test_a_model_without_right_thinking_answers_cannot_be_probed_and_keeps_its_answers(tiny_models, tmp_path):
    """The tiny random model never writes <think> (no examples): the error says so; the graded answers
    are kept, so a rerun does not generate them again."""
    cfg = ProbeConfig(model=str(tiny_models["llama"][1]), out=str(tmp_path / "p.safetensors"), seeds=(5,),
                      suites=("math",), n=2, max_tokens=12, num_threads=1)
    with pytest.raises(ValueError, match="right and wrong answers still thinking after 24 tokens"):
        run_probe(cfg)
    rec_file, state_file = records_files(cfg, 5)
    recs = [json.loads(x) for x in rec_file.read_text().splitlines()]
    assert len(recs) == 2 and all(r["correct"] is False for r in recs)
    assert torch.load(state_file).shape[0] == 2
    assert not (tmp_path / "p.safetensors").exists()


@pytest.mark.parametrize("kw, match", [(dict(seeds=()), "seeds"), (dict(seeds=(1, 1)), "seeds"),
                                       (dict(suites=("code",)), "suites"), (dict(n=0), "n must"),
                                       (dict(l2=0.0), "l2"), (dict(out="p.pt"), ".safetensors"),
                                       (dict(think_tokens=0), "think_tokens")])
def test_bad_settings_are_value_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        ProbeConfig(**({"model": "m", "out": "p.safetensors"} | kw)).validate()


def test_cli_says_what_is_wrong_before_loading(tmp_path):
    from llmopt.cli import app

    r = CliRunner().invoke(app, ["train", "probe", "-o", str(tmp_path / "p.safetensors"), "--seeds", "1,x"])
    assert r.exit_code == 2 and "--seeds takes comma-separated integers" in r.output
    r = CliRunner().invoke(app, ["train", "probe", "-o", str(tmp_path / "p.bin")])
    assert r.exit_code == 2 and ".safetensors" in r.output
