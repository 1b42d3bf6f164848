"""Quantization formats: round-trip error bounds (like llama.cpp's test-quantize-fns), packing
layouts, QuantLinear checkpoints and quantize_model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmopt.formats import layouts as F
from llmopt.formats import rtn
from llmopt.quant.linear import QuantLinear, quantize_model

# Upper bounds on ||dequant(quant(W)) - W|| / ||W|| for W ~ N(0, 1), [256, 1024], seed 0.
# Measured values (fp16 scales): int8 .0054/.0059/.0065, int4 .0785/.0897/.1001,
# int3 .146/.165/.179 and int2 .299/.325/.342 (with the default clipping search; plain min/max
# RTN gives int3 .168/.192/.215, int2 .394/.451/.503), fp8 .0264, fp4 .1156, w8a8 .0079.
# Theory for uniform RTN: rel_rmse ~= E[range of a group] / (2**bits - 1) / sqrt(12).
ERROR_BOUNDS = {
    ("int8", 32): 0.0062, ("int8", 64): 0.0066, ("int8", 128): 0.0072,
    ("int4", 32): 0.083, ("int4", 64): 0.094, ("int4", 128): 0.105,
    ("int3", 32): 0.155, ("int3", 64): 0.175, ("int3", 128): 0.19,
    ("int2", 32): 0.315, ("int2", 64): 0.345, ("int2", 128): 0.36,
    ("fp8", None): 0.029, ("fp4", None): 0.122, ("w8a8", None): 0.0086,
    ("w4a8", 64): 0.094,  # weights identical to int4 g64
}


def _w(n=256, k=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g)


@pytest.mark.parametrize("fmt,gs", sorted(ERROR_BOUNDS, key=str))
def test_roundtrip_error_bound(fmt, gs):
    w = _w()
    qw = F.quantize(w, fmt, gs)
    d = F.dequantize(qw)
    assert d.shape == w.shape and d.dtype == torch.float32
    rel = ((d - w).norm() / w.norm()).item()
    assert rel < ERROR_BOUNDS[(fmt, gs)], f"{fmt} g{gs}: rel err {rel:.4f}"
    # and not suspiciously exact (a broken quantizer that stores fp32 would pass the bound)
    assert rel > ERROR_BOUNDS[(fmt, gs)] / 3


@pytest.mark.parametrize("fmt,gain", [("int4", 0.05), ("int3", 0.10), ("int2", 0.20)])
def test_clipping_search_reduces_error(fmt, gain):
    w = _w(64, 512)
    e0 = (F.dequantize(F.quantize(w, fmt, 64, search=False)) - w).norm()
    e1 = (F.dequantize(F.quantize(w, fmt, 64, search=True)) - w).norm()
    assert e1 < (1 - gain) * e0


@pytest.mark.parametrize("fmt", ["int4", "int3", "int2"])
def test_fp32_scales_are_at_least_as_good(fmt):
    w = _w(64, 512)
    e16 = (F.dequantize(F.quantize(w, fmt, 64, torch.float16)) - w).norm()
    e32 = (F.dequantize(F.quantize(w, fmt, 64, torch.float32)) - w).norm()
    assert e32 <= e16 * 1.01


def test_bits_per_weight():
    w = _w(64, 512)
    assert F.quantize(w, "int4", 64).bits_per_weight == pytest.approx(4.5)
    assert F.quantize(w, "int4", 32).bits_per_weight == pytest.approx(5.0)
    assert F.quantize(w, "int4", 128, torch.float32).bits_per_weight == pytest.approx(4.5)
    assert F.quantize(w, "int3", 64).bits_per_weight == pytest.approx(3.5)
    assert F.quantize(w, "int2", 64).bits_per_weight == pytest.approx(2.5)
    assert F.quantize(w, "int8", 64).bits_per_weight == pytest.approx(8.25)
    assert F.quantize(w, "fp4").bits_per_weight == pytest.approx(4.25)
    assert F.quantize(w, "fp8").bits_per_weight == pytest.approx(8 + 32 / 512)
    assert F.quantize(w, "w8a8").bits_per_weight == pytest.approx(8 + 32 / 512)


def test_w4a8_layout_and_same_weights_as_int4():
    w = _w(3, 128)
    q4, q48 = F.quantize(w, "int4", 64), F.quantize(w, "w4a8", 64)
    assert torch.equal(F.codes(q4), F.codes(q48))
    assert torch.equal(F.dequantize(q4), F.dequantize(q48))
    p = q48["qweight"]
    c = F.codes(q48)
    assert p.shape == (3, 64)
    # byte i of a 64-block = q[i] | q[i + 32] << 4
    assert torch.equal(p[:, :32].to(torch.int64), c[:, :32] | (c[:, 32:64] << 4))


def test_lane_layout_int4():
    """Weight k = 8*j + l of a 64-block is nibble j of little-endian uint32 lane l."""
    q = (torch.arange(128) * 7 % 16).reshape(1, 128)
    p = F.pack_lanes(q, 4)
    assert p.shape == (1, 64) and p.dtype == torch.uint8
    for blk in range(2):
        for lane in range(8):
            b = p[0, blk * 32 + 4 * lane: blk * 32 + 4 * lane + 4].tolist()
            val = b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24
            for j in range(8):
                assert (val >> (4 * j)) & 15 == q[0, blk * 64 + 8 * j + lane]


@pytest.mark.parametrize("bits,k", [(4, 64), (4, 96), (2, 128), (2, 200), (1, 256)])
def test_pack_unpack_roundtrip(bits, k):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 1 << bits, (5, k), generator=g)
    lane_bits = 16 if bits == 1 else 32
    assert torch.equal(F.unpack_lanes(F.pack_lanes(q, bits, lane_bits), bits, k, lane_bits), q)


def test_int3_layout_and_codes():
    w = _w(7, 384)
    qw = F.quantize(w, "int3", 64, search=False)
    assert qw["qweight"].shape == (7, 384 // 128 * 48)
    c = F.codes(qw)
    assert c.min() >= 0 and c.max() <= 7
    # codes are the RTN codes
    q, s, m = rtn.rtn_affine(w, 3, 64)
    assert torch.equal(c, q.to(torch.int64))


def test_padding_when_k_not_multiple_of_block():
    w = _w(5, 96)  # int4 block is 64 -> padded to 128
    qw = F.quantize(w, "int4", 32)
    assert qw["qweight"].shape == (5, 64)
    assert qw["scales"].shape == (5, 3)
    d = F.dequantize(qw)
    assert d.shape == (5, 96)
    qw8 = F.quantize(_w(3, 100), "w8a8")
    assert qw8["qweight"].shape == (3, 128) and (qw8["qweight"][:, 100:] == 0).all()


def test_bad_group_size_raises():
    with pytest.raises(ValueError):
        F.quantize(_w(4, 96), "int4", 64)
    with pytest.raises(ValueError):
        F.quantize(_w(4, 128), "int4", 12)
    with pytest.raises(ValueError):
        F.quantize(_w(4, 128), "nope", 64)


def test_exactly_representable_weights_roundtrip_exactly():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (4, 128), generator=g).float()
    q[:, ::64] = 0
    q[:, 1::64] = 15  # every group spans the full code range
    w = q * 0.125 - 1.0  # scale, min exactly representable in fp16
    assert torch.equal(F.dequantize(F.quantize(w, "int4", 64)), w)
    # fp4: e2m1 values times a power of two
    vals = torch.tensor(rtn.E2M1_VALUES)
    idx = torch.randint(0, 8, (4, 64), generator=g)
    sign = torch.where(torch.rand(4, 64, generator=g) < 0.5, -1.0, 1.0)
    w4 = vals[idx] * sign * 0.25
    w4[:, ::32] = 6 * 0.25
    assert torch.equal(F.dequantize(F.quantize(w4, "fp4")), w4)


def test_fp8_codes_are_e4m3fn_and_not_nan():
    w = _w(16, 256) * 10
    qw = F.quantize(w, "fp8")
    v = qw["qweight"].view(torch.float8_e4m3fn).float()
    assert torch.isfinite(v).all()
    assert v.abs().max() <= 448
    # the row max maps to +-448 exactly
    assert torch.allclose(v.abs().amax(dim=1), torch.full((16,), 448.0))


def test_mxfp4_ties_round_to_even_mantissa():
    v = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75])
    codes = rtn._e2m1_encode(v)
    # 0.25 -> 0 (m=0), 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2.0, 3.5 -> 4.0, 5.0 -> 4.0
    assert codes.tolist() == [0, 2, 2, 4, 4, 6, 6, 10]


def test_activation_quantization():
    torch.manual_seed(0)
    x = torch.randn(5, 77)
    x[2] = 0
    xq, sx = rtn.quantize_activations_int8(x)
    assert xq.dtype == torch.int8 and xq.abs().max() <= 127
    assert (xq[2] == 0).all()
    err = (xq.float() * sx - x).abs().max(dim=1).values
    assert (err <= sx.squeeze(1) / 2 * (1 + 1e-5) + 1e-6).all()
    xq2, sx2 = rtn.quantize_activations_int8_grouped(x[:, :64], 32)
    assert sx2.shape == (5, 2) and xq2.abs().max() <= 127
    err2 = (xq2.float().reshape(5, 2, 32) * sx2.unsqueeze(-1) - x[:, :64].reshape(5, 2, 32)).abs()
    assert (err2 <= sx2.unsqueeze(-1) / 2 * (1 + 1e-5) + 1e-6).all()


# --------------------------------------------------------------------------------------------
# QuantLinear / quantize_model
# --------------------------------------------------------------------------------------------

ALL_FORMATS = ["int8", "int4", "int3", "int2", "fp8", "fp4", "w8a8", "w4a8"]


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("bias", [True, False])
def test_quantlinear_safetensors_roundtrip(tmp_path, fmt, bias):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    lin = nn.Linear(128, 33, bias=bias)
    ql = QuantLinear.from_linear(lin, fmt, group_size=64)
    x = torch.randn(3, 5, 128)
    y = ql(x)
    assert y.shape == (3, 5, 33)
    # close to the float layer (format-dependent accuracy)
    ref = lin(x).detach()
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < {"int2": 0.8, "int3": 0.35, "int4": 0.2, "w4a8": 0.2, "fp4": 0.2}.get(fmt, 0.05), rel
    sd = ql.state_dict()
    assert set(sd) == set(ql.packed_state())
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    path = tmp_path / "q.safetensors"
    save_file(sd, str(path), metadata={"fmt": ql.fmt, "group_size": str(ql.group_size)})
    loaded = load_file(str(path))
    ql2 = QuantLinear.from_packed(fmt, ql.group_size, 128, 33, loaded)
    assert ql2.fmt == fmt and ql2.group_size == ql.group_size
    assert (ql2.bias is not None) == bias
    assert torch.equal(ql2(x), y)
    # load_state_dict into a same-shaped module also works
    ql3 = QuantLinear.from_linear(nn.Linear(128, 33, bias=bias), fmt, group_size=64)
    ql3.load_state_dict(loaded)
    assert torch.equal(ql3(x), y)
    assert ql.bits_per_weight == pytest.approx(F.quantize(lin.weight, fmt, 64).bits_per_weight)


def test_quantlinear_from_packed_missing_tensor():
    ql = QuantLinear.from_linear(nn.Linear(64, 8), "int4", 32)
    sd = dict(ql.state_dict())
    del sd["mins"]
    with pytest.raises(ValueError):
        QuantLinear.from_packed("int4", 32, 64, 8, sd)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv_proj = nn.Linear(64, 3 * 64, bias=True)
        self.o_proj = nn.Linear(64, 64, bias=False)
        self.gate_up_proj = nn.Linear(64, 2 * 96, bias=False)
        self.down_proj = nn.Linear(96, 64, bias=False)

    def forward(self, h):
        q, k, v = self.qkv_proj(h).chunk(3, dim=-1)
        h = h + self.o_proj(q * torch.sigmoid(k) + v)
        g, u = self.gate_up_proj(h).chunk(2, dim=-1)
        return h + self.down_proj(torch.nn.functional.silu(g) * u)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 64)
        self.embed_proj = nn.Linear(64, 64)
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.lm_head = nn.Linear(64, 50, bias=False)

    def forward(self, ids):
        h = self.embed_proj(self.embed_tokens(ids))
        for blk in self.layers:
            h = blk(h)
        return self.lm_head(h)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_quantize_model_swaps_the_right_modules(fmt):
    torch.manual_seed(0)
    model = _Toy().eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        ref = model(ids)
    out_model = quantize_model(model, fmt, group_size=32, quantize_lm_head=False)
    assert out_model is model
    names = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    expect = {f"layers.{i}.{p}" for i in range(2) for p in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}
    assert names == expect
    assert type(model.lm_head) is nn.Linear and type(model.embed_proj) is nn.Linear
    assert isinstance(model.embed_tokens, nn.Embedding)
    assert all(m.fmt == fmt for m in model.modules() if isinstance(m, QuantLinear))
    assert model.layers[0].qkv_proj.bias is not None and model.layers[0].o_proj.bias is None
    with torch.no_grad():
        out = model(ids)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < {"int2": 0.6, "int3": 0.3, "int4": 0.15, "w4a8": 0.15, "fp4": 0.15}.get(fmt, 0.03), rel


def test_quantize_model_custom_skip_and_indivisible_layers():
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 40), nn.Linear(40, 4))
    quantize_model(model, "int4", group_size=32, skip=("2",))
    assert isinstance(model[0], QuantLinear)
    assert type(model[1]) is nn.Linear  # in_features 8 is not a multiple of 32 -> kept (logged)
    assert type(model[2]) is nn.Linear  # skipped by name


def test_model_dtype_cast_keeps_packed_dtypes():
    model = nn.Sequential(nn.Linear(64, 16))
    quantize_model(model, "int4", group_size=32, skip=())
    q = model[0]
    before = {k: v.dtype for k, v in q.state_dict().items()}
    x = torch.randn(2, 64)
    y = q(x)
    model.to(torch.bfloat16)
    assert {k: v.dtype for k, v in q.state_dict().items()} == before
    yb = model(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    assert torch.allclose(yb.float(), y, rtol=2e-2, atol=2e-2)


class _TiedToy(_Toy):
    def __init__(self):
        super().__init__()
        self.lm_head.weight = self.embed_tokens.weight  # tied, as SmolLM2


@pytest.mark.parametrize("head_fmt", [None, "int8"])
def test_quantize_tied_lm_head_keeps_embedding_float(head_fmt):
    torch.manual_seed(0)
    model = _TiedToy().eval()
    emb = model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        ref = model(ids)
    quantize_model(model, "int4", group_size=32, quantize_lm_head=True, lm_head_fmt=head_fmt)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.fmt == (head_fmt or "int4")
    assert isinstance(model.embed_tokens, nn.Embedding) and torch.equal(model.embed_tokens.weight, emb)
    assert type(model.embed_proj) is nn.Linear  # "embed" stays skipped
    expect = F.quantize(emb, head_fmt or "int4", 32)
    assert torch.equal(model.lm_head.qweight, expect["qweight"])
    with torch.no_grad():
        out = model(ids)
    assert ((out - ref).norm() / ref.norm()).item() < 0.15


def test_quantize_model_lm_head_defaults():
    from llmopt.quant import linear as L

    # default skip -> module default QUANTIZE_LM_HEAD (engine path)
    m = _TiedToy()
    quantize_model(m, "int4", group_size=32)
    assert isinstance(m.lm_head, QuantLinear) == L.QUANTIZE_LM_HEAD
    # a caller's own skip list keeps its meaning unless quantize_lm_head is given
    m = _TiedToy()
    quantize_model(m, "int4", group_size=32, skip=("lm_head", "embed"))
    assert type(m.lm_head) is nn.Linear
    m = _TiedToy()
    quantize_model(m, "int4", group_size=32, skip=("embed",), quantize_lm_head=False)
    assert type(m.lm_head) is nn.Linear
    m = _TiedToy()
    quantize_model(m, "int4", group_size=32, skip=("lm_head", "embed"), quantize_lm_head=True)
    assert isinstance(m.lm_head, QuantLinear)
    with pytest.raises(ValueError, match="lm_head format"):
        quantize_model(_TiedToy(), "int4", lm_head_fmt="int5")
