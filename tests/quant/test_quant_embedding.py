"""QuantEmbedding: exact row gathers of a packed table, sharing with a tied quantized lm_head, model
logits, checkpoints (save -> load_model / LLM(DIR) identical logits; old checkpoints still load) and
what ``llmopt quantize`` reports."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from llmopt import LLM
from llmopt.cli import app
from llmopt.config import ModelLoadError
from llmopt.formats import layouts as F
from llmopt.models.loader import load_model
from llmopt.quant.checkpoint import QUANT_CONFIG, WEIGHTS_FILE, round_float_weights_, save_quantized
from llmopt.quant.embedding import ROW_PACKED_FORMATS, QuantEmbedding
from llmopt.quant.linear import QuantLinear, quantize_model
from tests.conftest import save_hf_dir, tiny_hf_model

GS = 32  # tiny models: hidden 64, intermediate 96
ENGINE = dict(num_kv_blocks=32, block_size=16, num_threads=1)
IDS = [5, 17, 99, 200, 3, 319, 0, 17]


def _logits(model, ids=IDS):
    ids = torch.tensor(ids)
    with torch.inference_mode():
        return model.compute_logits(model(ids, torch.arange(len(ids))))


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory):  # llama with a tied head (the conftest llama is untied)
    return save_hf_dir(tiny_hf_model("llama", seed=1, tie_word_embeddings=True),
                       tmp_path_factory.mktemp("tied_llama"))


@pytest.fixture(scope="module")
def untied_qwen2_dir(tmp_path_factory):  # qwen2 with its own lm_head (the conftest qwen2 is tied)
    return save_hf_dir(tiny_hf_model("qwen2", seed=2, tie_word_embeddings=False),
                       tmp_path_factory.mktemp("untied_qwen2"))


# ---- the module ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ROW_PACKED_FORMATS)
def test_gather_equals_dequantized_table(fmt):
    torch.manual_seed(0)
    table = torch.randn(37, 128)  # odd vocabulary
    qw = F.quantize(table, fmt, 64)
    qe = QuantEmbedding(qw)
    ref = F.dequantize(qw)
    ids = torch.tensor([[0, 36, 5, 5], [11, 0, 36, 23]])  # first / last rows, repeats, 2-D
    out = qe(ids)
    assert out.shape == (2, 4, 128) and out.dtype == torch.float32
    assert torch.equal(out, ref[ids])
    assert torch.equal(qe(ids.to(torch.int32)), ref[ids])
    odd = torch.arange(1, 37, 2)  # every odd id
    assert torch.equal(qe(odd), ref[odd])
    assert torch.equal(qe.weight, ref)
    assert qe.bits_per_weight == pytest.approx(qw.bits_per_weight)
    assert qe(torch.zeros(0, dtype=torch.long)).shape == (0, 128)
    with pytest.raises(IndexError, match="out of range"):
        qe(torch.tensor([37]))
    # from an nn.Embedding: the same packing as formats.quantize of its table
    emb = nn.Embedding.from_pretrained(table)
    qe2 = QuantEmbedding.from_embedding(emb, fmt, 64)
    assert torch.equal(qe2(ids), ref[ids])


def test_state_dict_roundtrip_and_dtype_cast():
    torch.manual_seed(0)
    qe = QuantEmbedding.from_embedding(nn.Embedding(45, 64), "int4", 32)
    ids = torch.tensor([44, 1, 7])
    sd = qe.state_dict()
    assert set(sd) == {"qweight", "scales", "mins"}
    back = QuantEmbedding.from_packed("int4", 32, 45, 64, sd)
    assert torch.equal(back(ids), qe(ids))
    packed = {k: v.dtype for k, v in qe.state_dict().items()}
    qe.to(torch.bfloat16)  # packed dtypes are the format: kept; the rows come out in bf16
    assert {k: v.dtype for k, v in qe.state_dict().items()} == packed
    assert qe(ids).dtype == torch.bfloat16 and torch.equal(qe(ids), back(ids).to(torch.bfloat16))


def test_bad_inputs():
    emb = nn.Embedding(40, 64)
    with pytest.raises(ValueError, match="unknown format 'int5'"):
        QuantEmbedding.from_embedding(emb, "int5", 32)
    with pytest.raises(ValueError, match="unknown format 'nf4'"):
        QuantEmbedding(F.QuantizedWeight("nf4", (40, 64), 32, {"qweight": torch.zeros(40, 32, dtype=torch.uint8)}))
    qw = F.quantize(emb.weight, "int4", 32)
    across = F.QuantizedWeight("int4", (40, 64), 32, dict(qw.tensors, scales=qw["scales"].reshape(1, -1)))
    with pytest.raises(ValueError, match="packs across rows"):
        QuantEmbedding(across)
    with pytest.raises(ValueError, match=r"lacks packed tensors \['mins'\]"):
        QuantEmbedding(F.QuantizedWeight("int4", (40, 64), 32, {k: qw[k] for k in ("qweight", "scales")}))
    with pytest.raises(ValueError, match="needs a QuantLinear"):
        QuantEmbedding.tied_to(nn.Linear(64, 40))
    with pytest.raises(ValueError, match="group_size"):
        QuantEmbedding.from_embedding(emb, "int4", 12)
    with pytest.raises(ValueError, match="padding_idx"):
        QuantEmbedding.from_embedding(nn.Embedding(40, 64, padding_idx=0), "int8", 32)
    with pytest.raises(ValueError, match="unknown embedding format"):
        quantize_model(nn.Sequential(nn.Linear(64, 8)), "int4", 32, embedding_fmt="int5")


# ---- quantize_model policy ----------------------------------------------------------------------
def test_tied_embedding_shares_the_head(tied_llama_dir):
    lm = load_model(tied_llama_dir)
    m = lm.model
    assert m.lm_head.weight is m.embed_tokens.weight
    quantize_model(m, "int4", GS)  # engine path: int8 head (LM_HEAD_FMT), embedding shared
    e, h = m.embed_tokens, m.lm_head
    assert isinstance(e, QuantEmbedding) and isinstance(h, QuantLinear) and e.tied and e.source is h
    assert (e.fmt, e.group_size) == (h.fmt, h.group_size) == ("int8", GS)
    for key in ("qweight", "scales"):
        assert getattr(e, key).data_ptr() == getattr(h, key).data_ptr()
    assert not any("embed_tokens" in k for k in m.state_dict())  # one copy: lm_head's
    assert not any("embed_tokens" in n for n, _ in m.named_parameters())
    c = copy.deepcopy(m)  # sharing survives copies
    assert c.embed_tokens.source is c.lm_head and c.embed_tokens.qweight.data_ptr() == c.lm_head.qweight.data_ptr()
    ids = torch.tensor(IDS)
    assert torch.equal(e(ids), F.dequantize(h.qweight_packed)[ids])


def test_embedding_policy_switches(tied_llama_dir, untied_qwen2_dir):
    m = load_model(tied_llama_dir).model
    quantize_model(m, "int4", GS, quantize_embedding=False)
    assert isinstance(m.lm_head, QuantLinear) and type(m.embed_tokens) is nn.Embedding
    m = load_model(tied_llama_dir).model  # explicit head choice: embedding left alone unless asked
    quantize_model(m, "int4", GS, quantize_lm_head=True, lm_head_fmt="int4")
    assert type(m.embed_tokens) is nn.Embedding
    m = load_model(tied_llama_dir).model
    quantize_model(m, "int4", GS, quantize_lm_head=True, lm_head_fmt="int4", quantize_embedding=True)
    assert m.embed_tokens.source is m.lm_head and m.embed_tokens.fmt == "int4"
    m = load_model(tied_llama_dir).model
    with pytest.raises(ValueError, match="stays float"):
        quantize_model(m, "int4", GS, quantize_lm_head=False, quantize_embedding=True)
    m = load_model(tied_llama_dir).model
    with pytest.raises(ValueError, match="cannot differ"):
        quantize_model(m, "int4", GS, quantize_embedding=True, embedding_fmt="int4")
    # untied: float by default, its own table in the head's format when asked
    m = load_model(untied_qwen2_dir).model
    quantize_model(m, "int4", GS)
    assert isinstance(m.lm_head, QuantLinear) and type(m.embed_tokens) is nn.Embedding
    m = load_model(untied_qwen2_dir).model
    quantize_model(m, "int4", GS, quantize_embedding=True)
    e = m.embed_tokens
    assert isinstance(e, QuantEmbedding) and not e.tied and e.fmt == m.lm_head.fmt == "int8"
    assert e.qweight.data_ptr() != m.lm_head.qweight.data_ptr()


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_model_logits_equal_float_embedding_of_same_weights(tied_llama_dir, untied_qwen2_dir, which):
    d = tied_llama_dir if which == "tied" else untied_qwen2_dir
    m = load_model(d).model
    quantize_model(m, "int4", GS, quantize_embedding=True)
    assert isinstance(m.embed_tokens, QuantEmbedding)
    ref = copy.deepcopy(m)
    ref.embed_tokens = nn.Embedding.from_pretrained(m.embed_tokens.weight.clone())  # float, same values
    assert torch.equal(_logits(m), _logits(ref))


# ---- checkpoints --------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tied_llama", "untied_qwen2"])
def test_save_load_identical(tied_llama_dir, untied_qwen2_dir, tmp_path, which):
    from safetensors import safe_open

    tied = which == "tied_llama"
    lm = load_model(tied_llama_dir if tied else untied_qwen2_dir)
    quantize_model(lm.model, "int4", GS, quantize_embedding=True)
    round_float_weights_(lm.model, torch.bfloat16)
    out = tmp_path / "q"
    qc = save_quantized(lm.model, lm.tokenizer, lm.config, out, {"method": "rtn"})
    assert qc["format_version"] == 2 and qc["embedding_format"] == "int8"
    assert qc["embedding_shared_with_lm_head"] == tied
    spec = qc["embeddings"]["model.embed_tokens"]
    assert spec["shared_with"] == ("lm_head" if tied else None) and spec["num_embeddings"] == 320
    with safe_open(str(out / WEIGHTS_FILE), "pt") as st:
        emb_keys = {k for k in st.keys() if "embed_tokens" in k}
    assert emb_keys == (set() if tied else {"model.embed_tokens.qweight", "model.embed_tokens.scales"})
    # the quantized table is counted once in the averages
    n_params = sum(p.numel() for p in load_model(tied_llama_dir if tied else untied_qwen2_dir).model.parameters())
    assert qc["total_params"] == n_params
    back = load_model(out)
    be = back.model.embed_tokens
    assert isinstance(be, QuantEmbedding) and be.tied == tied
    if tied:
        assert be.source is back.model.lm_head and be.qweight.data_ptr() == back.model.lm_head.qweight.data_ptr()
    assert torch.equal(_logits(lm.model), _logits(back.model))
    llm = LLM(str(out), **ENGINE)  # the engine path loads it too
    assert torch.equal(_logits(lm.model), _logits(llm.engine.model))


def test_old_checkpoints_without_embedding_keys_load(tied_llama_dir, tmp_path):
    lm = load_model(tied_llama_dir)
    quantize_model(lm.model, "int4", GS, quantize_embedding=False)  # what the previous writer produced
    qc = save_quantized(lm.model, lm.tokenizer, lm.config, tmp_path / "old", {"method": "rtn"},
                        float_dtype=torch.float32)
    assert qc["format_version"] == 1 and qc["embedding_format"] is None
    raw = json.loads((tmp_path / "old" / QUANT_CONFIG).read_text())
    for k in ("embeddings", "embedding_format", "embedding_shared_with_lm_head"):
        del raw[k]
    (tmp_path / "old" / QUANT_CONFIG).write_text(json.dumps(raw))
    back = load_model(tmp_path / "old")
    assert type(back.model.embed_tokens) is nn.Embedding and isinstance(back.model.lm_head, QuantLinear)
    assert torch.equal(_logits(lm.model), _logits(back.model))


def test_embedding_load_errors(tied_llama_dir, tmp_path):
    lm = load_model(tied_llama_dir)
    quantize_model(lm.model, "int4", GS)
    d = tmp_path / "c"
    save_quantized(lm.model, lm.tokenizer, lm.config, d, {"method": "rtn"})
    good = json.loads((d / QUANT_CONFIG).read_text())
    bad = copy.deepcopy(good)
    bad["embeddings"]["model.embed_tokens"]["shared_with"] = "model.layers.0.mlp.down_proj"
    (d / QUANT_CONFIG).write_text(json.dumps(bad))
    with pytest.raises(ModelLoadError, match="does not match"):
        load_model(d)
    bad = copy.deepcopy(good)
    bad["embeddings"]["model.embed_tokens"]["shared_with"] = None  # then its tensors must be there
    (d / QUANT_CONFIG).write_text(json.dumps(bad))
    with pytest.raises(ModelLoadError, match="lacks tensor 'model.embed_tokens.qweight'"):
        load_model(d)
    bad = copy.deepcopy(good)
    bad["embeddings"]["model.embed_tokens"]["fmt"] = "int5"
    (d / QUANT_CONFIG).write_text(json.dumps(bad))
    with pytest.raises(ModelLoadError, match="format 'int5'"):
        load_model(d)
    bad = copy.deepcopy(good)
    bad["format_version"] = 3
    (d / QUANT_CONFIG).write_text(json.dumps(bad))
    with pytest.raises(ModelLoadError, match="upgrade llmopt"):
        load_model(d)


# ---- llmopt quantize ----------------------------------------------------------------------------
def test_cli_counts_the_quantized_embedding(tiny_models, tmp_path):
    hf_dir = tiny_models["qwen2"][1]  # tied
    res = {}
    for mode in ("auto", "float"):
        out, js = tmp_path / mode, tmp_path / f"{mode}.json"
        r = CliRunner().invoke(app, ["quantize", str(hf_dir), "-o", str(out), "-g", str(GS), "--json", str(js),
                                     "--ppl-texts", "0", "--embedding", mode])
        assert r.exit_code == 0, r.output  # includes --verify (bit-identical reload)
        res[mode] = json.loads(js.read_text())
    a, f = res["auto"], res["float"]
    assert a["embedding_format"] == "int8" and a["embedding_shared_with_lm_head"] and a["lm_head_format"] == "int8"
    assert f["embedding_format"] is None and f["lm_head_format"] == "int8"
    # the bf16 table (320 x 64 x 2 B) is gone from the file; the int8 head is stored either way
    assert f["size_bytes"] - a["size_bytes"] >= 320 * 64 * 2 - 1024
    assert a["compression_vs_bf16"] > f["compression_vs_bf16"]
    assert a["bits_per_weight"] == f["bits_per_weight"]  # shared: the table is the head, counted once
    r = CliRunner().invoke(app, ["quantize", str(hf_dir), "-o", str(tmp_path / "x"), "--ppl-texts", "0",
                                 "-g", str(GS), "--lm-head", "float", "--embedding", "quantized"])
    assert r.exit_code == 1 and "give --lm-head int8" in r.output
    r = CliRunner().invoke(app, ["quantize", str(hf_dir), "-o", str(tmp_path / "y"), "--ppl-texts", "0",
                                 "--embedding", "sometimes"])
    assert r.exit_code == 1 and "--embedding 'sometimes'" in r.output
