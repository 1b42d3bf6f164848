"""Crafted GGUF headers (a zero alignment, counts larger than the file, data past its end, negative
or too many dimensions, unknown value types) are refused with one line naming what is wrong, never
a ZeroDivisionError, MemoryError or a hang."""

import struct

import pytest
from typer.testing import CliRunner

from llmopt.cli import app
from llmopt.config import ModelLoadError
from llmopt.models.gguf_file import GGUFFile, GGUFFormatError
from llmopt.models.loader import load_model

U32, STR, ARR = 4, 8, 9  # GGUFValueType ids


def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def _kv_u32(key: str, v: int) -> bytes:
    return _s(key) + struct.pack("<II", U32, v)


def _kv_str(key: str, v: str) -> bytes:
    return _s(key) + struct.pack("<I", STR) + _s(v)


def _tensor_info(name: str, dims: list[int], qtype: int = 0, offset: int = 0, fmt: str = "Q") -> bytes:
    return _s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}{fmt}", *dims) + \
        struct.pack("<IQ", qtype, offset)


def _gguf(kvs: list[bytes], infos: list[bytes], data: bytes = b"\0" * 64, n_kv: int | None = None,
          n_tensors: int | None = None) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % 32) + data


GOOD_KVS = [_kv_str("general.architecture", "llama")]
GOOD_TENSOR = [_tensor_info("token_embd.weight", [4, 4])]  # F32, 64 bytes


def test_a_well_formed_crafted_file_parses():
    """The control for the cases below: the same builder without the defect is read fine."""
    gf = _open_bytes(_gguf(GOOD_KVS, GOOD_TENSOR))
    assert [t.name for t in gf.tensors] == ["token_embd.weight"] and gf.tensors[0].nbytes == 64


_tmp = {}


def _open_bytes(data: bytes) -> GGUFFile:
    path = _tmp["dir"] / "crafted.gguf"
    path.write_bytes(data)
    return GGUFFile(path)


@pytest.fixture(autouse=True)
def _crafted_dir(tmp_path):
    _tmp["dir"] = tmp_path


@pytest.mark.parametrize("data, message", [
    (_gguf([*GOOD_KVS, _kv_u32("general.alignment", 0)], GOOD_TENSOR), "general.alignment is 0"),
    (_gguf([*GOOD_KVS, _kv_u32("general.alignment", 24)], GOOD_TENSOR), "general.alignment is 24"),
    (_gguf([*GOOD_KVS, _kv_str("general.alignment", "32")], GOOD_TENSOR), "general.alignment is '32'"),
    (_gguf(GOOD_KVS, GOOD_TENSOR, n_tensors=2**63), "claims 9,223,372,036,854,775,808 tensors"),
    (_gguf(GOOD_KVS, GOOD_TENSOR, n_kv=2**40), "claims 1,099,511,627,776 metadata entries"),
    (_gguf(GOOD_KVS, [_tensor_info("token_embd.weight", [4, 4], offset=2**40)]), "needs bytes up to"),
    (_gguf(GOOD_KVS, [_tensor_info("token_embd.weight", [4, 2**62])]), "needs bytes up to"),
    (_gguf(GOOD_KVS, [_tensor_info("token_embd.weight", [4, -4], fmt="q")]), "negative dimension"),
    (_gguf(GOOD_KVS, [_tensor_info("token_embd.weight", [4, 4], offset=3)]), "not a multiple of the alignment"),
    (_gguf(GOOD_KVS, [_tensor_info("token_embd.weight", [1] * 9)]), "has 9 dimensions"),
    (_gguf(GOOD_KVS, [_tensor_info("token_embd.weight", [2**32 - 1])]), "needs bytes up to"),
    (_gguf(GOOD_KVS, [_tensor_info("token_embd.weight", [31, 1], qtype=2)]), "not a multiple of its block size 32"),
    (_gguf([*GOOD_KVS, _s("x") + struct.pack("<I", 99)], GOOD_TENSOR), "unknown value type 99"),
    (_gguf([*GOOD_KVS, _s("x") + struct.pack("<IIQ", ARR, U32, 2**61)], GOOD_TENSOR),
     "claims 2,305,843,009,213,693,952 elements in metadata 'x'"),
    (_gguf([*GOOD_KVS, _s("x") + struct.pack("<IIQ", ARR, STR, 2**50)], GOOD_TENSOR), "elements in metadata 'x'"),
])
def test_absurd_header_values_are_a_format_error(data, message):
    with pytest.raises(GGUFFormatError, match="crafted.gguf") as e:
        _open_bytes(data)
    assert message in str(e.value)


def _with_kvs(gguf_bytes: bytes, extra: bytes) -> bytes:
    """A real GGUF file with ``extra`` metadata inserted after the header. ``extra`` must be a
    multiple of 32 bytes long so the (default 32-aligned) tensor data keeps its offsets."""
    assert len(extra) % 32 == 0
    n_kv = struct.unpack_from("<Q", gguf_bytes, 16)[0]
    return gguf_bytes[:16] + struct.pack("<Q", n_kv + 2) + extra + gguf_bytes[24:]


def _alignment_kvs(align: int) -> bytes:
    extra = _kv_u32("general.alignment", align) + _kv_str("pad", "12345678")  # 33 + 31 bytes
    assert len(extra) == 64
    return extra


def test_real_model_with_alignment_zero_is_refused_in_one_line(tiny_models, tmp_path):
    src = tiny_models["llama"][2].read_bytes()
    control = tmp_path / "aligned32.gguf"
    control.write_bytes(_with_kvs(src, _alignment_kvs(32)))
    assert load_model(control).model is not None  # the insertion itself keeps the file loadable
    bad = tmp_path / "aligned0.gguf"
    bad.write_bytes(_with_kvs(src, _alignment_kvs(0)))
    with pytest.raises(ModelLoadError, match="general.alignment is 0"):
        load_model(bad)
    res = CliRunner().invoke(app, ["generate", str(bad), "hi", "--max-tokens", "2"])
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "general.alignment is 0" in lines[0], res.output


def _set_u32(gguf_bytes: bytes, key: str, value: int) -> bytes:
    """Overwrite the u32 value of metadata ``key`` in place (same length, so offsets stay valid)."""
    k = key.encode()
    at = gguf_bytes.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)
    vtype = struct.unpack_from("<I", gguf_bytes, at)[0]
    assert vtype in (4, 5), vtype  # u32 / i32
    return gguf_bytes[:at + 4] + struct.pack("<I", value) + gguf_bytes[at + 8:]


@pytest.mark.parametrize("key,value", [("llama.attention.head_count", 0), ("llama.attention.head_count_kv", 0),
                                       ("llama.attention.head_count_kv", 3)])
def test_inconsistent_head_counts_are_refused_not_a_division_by_zero(tiny_models, tmp_path, key, value):
    bad = tmp_path / "heads.gguf"
    bad.write_bytes(_set_u32(tiny_models["llama"][2].read_bytes(), key, value))
    with pytest.raises(ModelLoadError, match="GGUF metadata is inconsistent"):
        load_model(bad)
