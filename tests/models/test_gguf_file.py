"""Our fast GGUF header reader agrees with the gguf package's GGUFReader."""

import gguf
import numpy as np
import pytest

from llmopt.models.gguf_file import GGUFFile
from tests.conftest import requires_smollm2, smollm2_path


def _same_as_reader(path):
    ours = GGUFFile(path)
    ref = gguf.GGUFReader(str(path))
    ref_fields = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.fields) == set(ref_fields)
    for k, v in ref_fields.items():
        if isinstance(v, float):
            assert ours.fields[k] == pytest.approx(v), k
        else:
            assert ours.fields[k] == v, k
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.qtype == b.tensor_type and a.shape == tuple(int(s) for s in b.shape)
        assert a.nbytes == b.n_bytes and np.array_equal(a.data, np.asarray(b.data).reshape(-1).view(np.uint8))


def test_reader_matches_gguf_package_on_written_file(tiny_models):
    _same_as_reader(tiny_models["qwen3"][2])


@requires_smollm2
def test_reader_matches_gguf_package_on_smollm2():
    _same_as_reader(smollm2_path())
