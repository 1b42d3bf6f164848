"""Quantized checkpoints (save -> LLM(DIR) reload is bit-identical), mixed precision (sensitivity,
bit allocation, plans), and the ``llmopt quantize`` command, on the tiny models of conftest."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from llmopt import LLM, SamplingParams
from llmopt.cli import app
from llmopt.config import ModelLoadError
from llmopt.models.loader import load_model
from llmopt.quant import mixed
from llmopt.quant.checkpoint import QUANT_CONFIG, WEIGHTS_FILE, load_quantized, round_float_weights_, save_quantized
from llmopt.quant.linear import QuantLinear, quantize_model

GS = 32  # the tiny models have in_features 64 and 96
ENGINE = dict(num_kv_blocks=32, block_size=16, num_threads=1)
PROMPTS = [[5, 17, 99, 200, 3], [260, 40, 41, 42]]


def _logits(model, ids):
    ids = torch.tensor(ids)
    with torch.inference_mode():
        return model.compute_logits(model(ids, torch.arange(len(ids))))


def _greedy(llm):
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("fmt,arch,src", [("int4", "llama", "gguf"), ("int8", "qwen2", "hf"),
                                          ("fp8", "qwen3", "hf"), ("w4a8", "qwen2", "gguf")])
def test_reload_identical(tiny_models, tmp_path, fmt, arch, src):
    _, hf_dir, gguf_path = tiny_models[arch]
    path = str(gguf_path if src == "gguf" else hf_dir)
    mem = LLM(path, quant=fmt, group_size=GS, **ENGINE)  # the in-memory quantized model
    m = mem.engine.model
    assert any(isinstance(x, QuantLinear) for x in m.modules())
    qc = save_quantized(m, mem.tokenizer, mem.engine.model_config, tmp_path / "q", {"method": "rtn"},
                        float_dtype=torch.float32)
    assert qc["format"] == fmt and qc["method"] == "rtn"
    # the engine may quantize lm_head in its own format (linear.LM_HEAD_FMT)
    assert {v["fmt"] for k, v in qc["modules"].items() if k != "lm_head"} == {fmt}
    assert qc["lm_head_format"] == (qc["modules"]["lm_head"]["fmt"] if "lm_head" in qc["modules"] else None)
    assert qc["modules"]["model.layers.0.self_attn.qkv_proj"]["in_features"] == 64
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / WEIGHTS_FILE), "pt") as st:
        assert "model.layers.0.self_attn.qkv_proj.qweight" in st.keys()
    back = LLM(str(tmp_path / "q"), **ENGINE)
    assert torch.equal(_logits(m, PROMPTS[0]), _logits(back.engine.model, PROMPTS[0]))
    assert _greedy(mem) == _greedy(back)
    # tokenizer, chat template and stop ids survive
    msgs = [{"role": "user", "content": "hi"}]
    assert back.tokenizer.apply_chat_template(msgs) == mem.tokenizer.apply_chat_template(msgs)
    assert back.tokenizer.stop_token_ids == mem.tokenizer.stop_token_ids
    assert back.engine.model_config.eos_token_ids == mem.engine.model_config.eos_token_ids
    assert back.engine.model_config.tie_word_embeddings == mem.engine.model_config.tie_word_embeddings
    # transformers reads the config too
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "q").model_type == arch


def test_bf16_floats_and_mixed_plan_reload_identical(tiny_models, tmp_path):
    _, hf_dir, _ = tiny_models["llama"]  # untied lm_head: stored as a float tensor
    lm = load_model(hf_dir)
    names = list(mixed.linear_sizes(lm.model))
    fmts = ["int2", "int3", "int4", "int8", "fp8", "w4a8", "fp4", "w8a8"]
    plan = {n: fmts[i % len(fmts)] for i, n in enumerate(names)}
    mixed.quantize_mixed(lm.model, plan, GS)
    round_float_weights_(lm.model, torch.bfloat16)
    qc = save_quantized(lm.model, lm.tokenizer, lm.config, tmp_path / "mx", {"method": "rtn"})
    assert qc["format"] == "mixed" and qc["float_dtype"] == "bfloat16"
    assert {k.removeprefix("model."): v["fmt"] for k, v in qc["modules"].items()} == plan
    back = load_model(tmp_path / "mx")
    assert torch.equal(_logits(lm.model, PROMPTS[1]), _logits(back.model, PROMPTS[1]))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "mx" / WEIGHTS_FILE), "pt") as st:
        assert st.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert st.get_tensor("model.layers.0.self_attn.qkv_proj.qweight").dtype == torch.uint8
    llm = LLM(str(tmp_path / "mx"), **ENGINE)
    assert all(len(t) == 12 for t in _greedy(llm))


def _ckpt(tiny_models, tmp_path, fmt="int4"):
    lm = load_model(tiny_models["qwen2"][1])
    quantize_model(lm.model, fmt, GS)
    save_quantized(lm.model, lm.tokenizer, lm.config, tmp_path / "c", {"method": "rtn"})
    return tmp_path / "c"


def test_load_errors(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _ckpt(tiny_models, tmp_path)
    qc_path = d / QUANT_CONFIG
    good = qc_path.read_text()
    mod = "model.layers.0.mlp.gate_up_proj"

    qc = json.loads(good)
    qc["modules"][mod]["fmt"] = "int5"
    qc_path.write_text(json.dumps(qc))
    with pytest.raises(ModelLoadError, match="unknown format 'int5'"):
        load_model(d)

    qc = json.loads(good)
    qc["modules"][mod]["out_features"] = 100
    qc_path.write_text(json.dumps(qc))
    with pytest.raises(ModelLoadError, match=r"is \[100, 64\] but the model"):
        load_model(d)
    qc_path.write_text(good)

    tensors = load_file(d / WEIGHTS_FILE)
    orig = dict(tensors)
    tensors[f"{mod}.scales"] = tensors[f"{mod}.scales"][:, :1].contiguous()
    save_file(tensors, d / WEIGHTS_FILE)
    with pytest.raises(ModelLoadError, match="scales.*needs"):
        load_quantized(d)
    del tensors[f"{mod}.scales"]
    save_file(tensors, d / WEIGHTS_FILE)
    with pytest.raises(ModelLoadError, match="lacks tensor 'model.layers.0.mlp.gate_up_proj.scales'"):
        load_model(d)
    t2 = dict(orig)
    del t2["model.norm.weight"]
    save_file(t2, d / WEIGHTS_FILE)
    with pytest.raises(ModelLoadError, match="lacks 1 tensors"):
        load_model(d)
    qc_path.write_text("{not json")
    with pytest.raises(ModelLoadError, match="not readable JSON"):
        load_model(d)


# ---- mixed precision ----------------------------------------------------------------------------
def test_layer_sensitivity_restores_and_orders(tiny_models):
    lm = load_model(tiny_models["qwen3"][1])
    ids = [list(range(3, 35)), list(range(100, 132))]
    before = _logits(lm.model, ids[0])
    sens = mixed.layer_sensitivity(lm.model, ids, group_size=GS)
    assert set(sens) == set(mixed.linear_sizes(lm.model))
    for name, d in sens.items():
        assert set(d) == {"int2", "int3", "int4", "int8"}
        assert all(v > -1e-6 and math.isfinite(v) for v in d.values())
        assert d["int8"] < d["int4"] < d["int2"], (name, d)
        assert isinstance(lm.model.get_submodule(name), torch.nn.Linear)
    assert torch.equal(before, _logits(lm.model, ids[0]))


SIZES = {"a": (256, 1024), "b": (256, 1024), "c": (512, 1024)}
SENS = {"a": {"int2": 10.0, "int3": 5.0, "int4": 2.0, "int8": 0.01},   # sensitive
        "b": {"int2": 0.05, "int3": 0.03, "int4": 0.02, "int8": 0.0},  # insensitive
        "c": {"int2": 1.0, "int3": 0.5, "int4": 0.1, "int8": 0.001}}


def _avg(plan):
    return mixed.plan_bits(plan, SIZES, 64)


def test_allocate_bits_target_and_preference():
    bits = {f: mixed.format_bits(f, 1024, 64) for f in ("int2", "int3", "int4", "int8")}
    assert bits["int4"] == pytest.approx(4.5) and bits["int2"] == pytest.approx(2.5)
    assert bits["int8"] == pytest.approx(8.25)  # int8 at group 64: fp16 scale per 64 -> 8 + 16/64
    plan, avg = mixed.allocate_bits(SENS, SIZES, target_bits=4.5)
    assert avg <= 4.5 + 1e-9 and avg == pytest.approx(_avg(plan))
    assert plan["b"] == "int2" and plan["a"] in ("int4", "int8")  # low bits where it does not hurt
    prev = math.inf
    for target in (2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.25, 12.0):
        plan, avg = mixed.allocate_bits(SENS, SIZES, target_bits=target)
        total = sum(SENS[n][f] for n, f in plan.items())
        assert avg <= target + 1e-9 and total <= prev + 1e-12
        prev = total
    assert plan == {"a": "int8", "b": "int8", "c": "int8"}
    # brute force agrees on this small instance
    import itertools

    best = min((sum(SENS[n][f] for n, f in zip(SIZES, c)), c)
               for c in itertools.product(bits, repeat=3) if _avg(dict(zip(SIZES, c))) <= 4.5 + 1e-9)
    plan, _ = mixed.allocate_bits(SENS, SIZES, target_bits=4.5)
    assert sum(SENS[n][f] for n, f in plan.items()) == pytest.approx(best[0])


def test_allocate_bits_menu_and_errors():
    plan, avg = mixed.allocate_bits(SENS, SIZES, menu="2,8")
    assert set(plan.values()) <= {"int2", "int8"}
    assert avg <= (2.5 + 8.25) / 2 + 1e-9  # target = mean of the menu formats' bits
    plan2, _ = mixed.allocate_bits(SENS, SIZES, menu=[2, 8])
    # budget (2.5 + 8.25) / 2 is exactly a, b at int8 and c (twice the size, less sensitive than a) at int2
    assert plan2 == plan == {"a": "int8", "b": "int8", "c": "int2"}
    plan, avg = mixed.allocate_bits(SENS, SIZES, target_bits=4.5, menu="4")
    assert set(plan.values()) == {"int4"}
    assert mixed.allocate_bits(SENS, SIZES, target_bits=4.0)[0] == mixed.allocate_bits(SENS, SIZES, target_bits=4.0)[0]
    with pytest.raises(ValueError, match="below the smallest possible 2.500"):
        mixed.allocate_bits(SENS, SIZES, target_bits=2.2)
    with pytest.raises(ValueError, match="widths"):
        mixed.allocate_bits(SENS, SIZES, menu="2,5")
    with pytest.raises(ValueError, match="target_bits or a menu"):
        mixed.allocate_bits(SENS, SIZES)


# ---- CLI ----------------------------------------------------------------------------------------
def _run(args):
    return CliRunner().invoke(app, ["quantize", *map(str, args)])


def test_cli_json_and_reload(tiny_models, tmp_path):
    gguf_path = tiny_models["llama"][2]
    out, js = tmp_path / "q4", tmp_path / "q4.json"
    res = _run([gguf_path, "-o", out, "-g", GS, "--json", js, "--ppl-texts", 2, "--ppl-tokens", 64])
    assert res.exit_code == 0, res.output
    r = json.loads(js.read_text())
    for k in ("format", "method", "bits_per_weight", "size_bytes", "compression_vs_bf16", "ppl_before", "ppl_after",
              "seconds"):
        assert k in r, k
    assert r["format"] == "int4" and r["method"] == "rtn"
    assert r["size_bytes"] == (out / WEIGHTS_FILE).stat().st_size
    assert r["compression_vs_bf16"] > 1 and r["compression_vs_bf16"] == pytest.approx(r["bf16_bytes"] / r["size_bytes"])
    # int4 g32 body (5 bpw) + the default int8 g32 lm_head (8.5 bpw), a quarter of this tiny model's weights
    assert r["lm_head_format"] == "int8" and 5 < r["bits_per_weight"] < 8.5
    assert math.isfinite(r["ppl_before"]) and math.isfinite(r["ppl_after"]) and r["ppl_before"] > 1
    assert abs(math.log(r["ppl_after"] / r["ppl_before"])) < 0.5
    assert "compression vs BF16" in res.output
    assert isinstance(load_model(out).model.layers[0].self_attn.qkv_proj, QuantLinear)
    # refuses a non-empty output directory unless --force
    res = _run([gguf_path, "-o", out, "-g", GS, "--ppl-texts", 0])
    assert res.exit_code == 1 and "not empty" in res.output and "--force" in res.output
    assert _run([gguf_path, "-o", out, "-g", GS, "--ppl-texts", 0, "--force", "--format", "int8"]).exit_code == 0
    assert json.loads((out / QUANT_CONFIG).read_text())["format"] == "int8"


def test_cli_mixed(tiny_models, tmp_path):
    hf_dir = tiny_models["qwen2"][1]
    out, js = tmp_path / "mx", tmp_path / "mx.json"
    res = _run([hf_dir, "-o", out, "-g", GS, "--bits", "2,4,8", "--json", js, "--ppl-texts", 1, "--ppl-tokens", 32,
                "--sens-seqs", 2, "--sens-len", 32])
    assert res.exit_code == 0, res.output
    r = json.loads(js.read_text())
    qc = json.loads((out / QUANT_CONFIG).read_text())
    assert r["format"] == "mixed" and set(r["plan"].values()) <= {"int2", "int4", "int8"}
    # the plan covers the decoder linears; lm_head is --lm-head (int8 by default), outside the plan
    assert {k.removeprefix("model."): v["fmt"] for k, v in qc["modules"].items() if k != "lm_head"} == r["plan"]
    assert qc["modules"]["lm_head"]["fmt"] == "int8"
    assert r["plan_bits_per_weight"] <= r["target_bits"] + 1e-9
    assert set(r["sensitivity"]) == set(r["plan"])
    assert r["compression_vs_bf16"] > 1 and math.isfinite(r["ppl_after"])


@pytest.mark.parametrize("args,msg", [
    (["--format", "int5"], "unknown format 'int5'"),
    (["--method", "squeeze"], "unknown method 'squeeze'"),
    (["--method", "gptq", "--format", "fp8"], "supports"),
    (["-g", "64"], "does not divide in_features=96"),
    (["-g", "12"], "multiple of 8"),
    (["--bits", "1.5"], "must be in (2, 16]"),
    (["--bits", "40"], "must be in (2, 16]"),
    (["--bits", "2,5"], "widths"),
    (["-g", "32", "--bits", "2.6"], "lowest average"),
    (["--float-dtype", "int8"], "--float-dtype"),
])
def test_cli_errors(tiny_models, tmp_path, args, msg):
    res = _run([tiny_models["qwen2"][1], "-o", tmp_path / "o", "--ppl-texts", 0, *args])
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], res.output
    assert "Traceback" not in res.output


def test_cli_missing_model(tmp_path):
    res = _run([tmp_path / "nope", "-o", tmp_path / "o"])
    assert res.exit_code == 1 and "does not exist" in res.output


@pytest.mark.parametrize("method,bits", [("gptq", None), ("awq", "2,4")])
def test_cli_calibrated_methods(tiny_models, tmp_path, method, bits):
    pytest.importorskip(f"llmopt.quant.{method}")
    out, js = tmp_path / method, tmp_path / f"{method}.json"
    args = [tiny_models["qwen3"][1], "-o", out, "-g", GS, "--method", method, "--json", js, "--calib-seqs", 2,
            "--seq-len", 32, "--ppl-texts", 1, "--ppl-tokens", 32, "--sens-seqs", 1, "--sens-len", 32]
    res = _run(args + (["--bits", bits] if bits else []))
    assert res.exit_code == 0, res.output  # includes --verify: the reload is bit-identical
    r = json.loads(js.read_text())
    qc = json.loads((out / QUANT_CONFIG).read_text())
    assert r["method"] == qc["method"] == method and math.isfinite(r["ppl_after"])
    if bits:
        assert set(r["plan"].values()) <= {"int2", "int4"} and qc["format"] in ("mixed", "int2", "int4")
    else:
        assert qc["format"] == "int4" and len(qc["modules"]) == 9  # 2 layers x 4 linears + the int8 lm_head
        assert qc["lm_head_format"] == "int8"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # tied / untied embeddings
def test_quantized_lm_head_reload_identical(tiny_models, tmp_path, arch):
    lm = load_model(tiny_models[arch][1])
    quantize_model(lm.model, "int4", GS)
    lm.model.lm_head = QuantLinear.from_linear(lm.model.lm_head, "int8", GS)
    qc = save_quantized(lm.model, lm.tokenizer, lm.config, tmp_path / "h", {"method": "rtn"},
                        float_dtype=torch.float32)
    assert "lm_head" in qc["modules"] and not qc["lm_head_tied_to_embeddings"]
    back = load_model(tmp_path / "h")
    assert isinstance(back.model.lm_head, QuantLinear)
    assert torch.equal(_logits(lm.model, PROMPTS[0]), _logits(back.model, PROMPTS[0]))


def test_cli_refuses_quantized_input(tiny_models, tmp_path):
    d = _ckpt(tiny_models, tmp_path)
    res = _run([d, "-o", tmp_path / "again", "-g", GS])
    assert res.exit_code == 1 and "already an llmopt quantized checkpoint" in res.output
