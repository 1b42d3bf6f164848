"""A model file with corrupt bytes (NaN / infinity after decoding) is refused at load with the
tensor's name, instead of loading and then answering with empty text."""

import shutil

import pytest
import torch
from typer.testing import CliRunner

from llmopt.cli import app
from llmopt.config import ModelLoadError
from llmopt.models.gguf_file import GGUFFile
from llmopt.models.loader import gguf_to_hf_name, load_model
from llmopt.models.registry import resolve
from llmopt.models.validate import check_finite
from tests.conftest import SMOLLM2, requires_smollm2


def _overwrite(path, offset: int, length: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * length)


def test_gguf_with_a_tensor_overwritten_by_0xff_is_refused_naming_it(tiny_models, tmp_path):
    src = tiny_models["llama"][2]
    assert load_model(src).model is not None  # control: the intact file loads
    bad = tmp_path / "corrupt.gguf"
    shutil.copy(src, bad)
    victim = next(t for t in GGUFFile(src).tensors if t.name == "blk.1.ffn_down.weight")
    _overwrite(bad, victim.offset + 8, 16)
    with pytest.raises(ModelLoadError) as e:
        load_model(bad)
    msg = str(e.value)
    assert "corrupt.gguf" in msg and repr(gguf_to_hf_name(victim.name)) in msg and "non-finite" in msg
    res = CliRunner().invoke(app, ["generate", str(bad), "hi", "--max-tokens", "2"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "non-finite" in res.output and "ffn_down" not in res.output  # the HF name, once
    assert "mlp.down_proj" in res.output


@requires_smollm2
def test_smollm2_with_40_mb_of_0xff_is_refused(tmp_path):
    """The issue's reproduction: 40 MB of 0xff in the real Q4_1 file used to load and answer ''."""
    src = resolve(SMOLLM2)
    bad = tmp_path / "smollm2-corrupt.gguf"
    shutil.copy(src, bad)
    gf = GGUFFile(src)
    start = gf.tensors[len(gf.tensors) // 2].offset
    _overwrite(bad, start, 40 * 2**20)
    with pytest.raises(ModelLoadError, match=r"smollm2-corrupt.gguf: tensor 'model\.layers\.\d+\..*' holds [\d,]+ non-finite"):
        load_model(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_finds_one_bad_value_anywhere(dtype, bad):
    t = torch.randn(257, 33).to(dtype)
    check_finite("w", t, "file")  # finite: passes
    t[200, 17] = bad
    with pytest.raises(ModelLoadError, match="tensor 'w' holds 1 non-finite values"):
        check_finite("w", t, "file")


def test_check_finite_ignores_integer_tensors_and_large_finite_values():
    check_finite("ids", torch.full((10,), 2**31 - 1, dtype=torch.int32), "file")
    check_finite("big", torch.full((1000,), 3.0e38), "file")  # would overflow a sum, not a min/max
