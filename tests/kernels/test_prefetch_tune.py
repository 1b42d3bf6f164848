"""Per-CPU prefetch distances of the GGUF kernels (llmopt.kernels.tune): measured, stored, applied
at load, and never changing a result."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import gguf
import pytest
import torch

from llmopt.kernels import build, tune
from llmopt.kernels import gguf_linear as G

QT = gguf.GGMLQuantizationType


@pytest.fixture
def path_mod() -> Iterator[tuple[str, object]]:
    """The default native path's module; every prefetch distance restored afterwards."""
    if not build.native_enabled() or G.cpu_path() not in G.PATHS:
        pytest.skip("no native GGUF path on this machine")
    path = G.cpu_path()
    mod = G.native_module(path)
    saved = {(t, f): mod.prefetch(int(QT[t]), f) for t in G.supported_types() for f in (0, 1)}
    yield path, mod
    for (t, f), v in saved.items():
        mod.set_prefetch(int(QT[t]), f, v)


@pytest.mark.parametrize("qt", [QT.Q4_1, QT.Q5_0, QT.Q8_0, QT.Q4_K, QT.Q6_K, QT.Q3_K], ids=lambda q: q.name)
def test_results_do_not_depend_on_the_prefetch_distance(path_mod, qt: QT) -> None:
    path, mod = path_mod
    import numpy as np

    n, k = 40, 512
    raw = tune.random_blocks(qt, n, k, np.random.default_rng(1))
    pk = G.pack_gguf(raw, qt, (n, k))
    x = torch.randn(3, k)
    acts = ["fp32"] + (["int8"] if qt.name in G.supported_types("int8") else [])
    for act in acts:
        outs = []
        for pf in (0, 128, 4096, tune.GROUP):  # GROUP: the next group of panels, block by block
            for fam in (0, 1):
                mod.set_prefetch(int(qt), fam, pf)
            outs.append([G.gguf_linear(x[:m], pk, act=act, path=path) for m in (1, 3)])
        for other in outs[1:]:
            for a, b in zip(outs[0], other):
                assert torch.equal(a, b)
    assert torch.isfinite(outs[0][1]).all()


def test_set_prefetch_round_trips_and_refuses_bad_arguments(path_mod) -> None:
    _, mod = path_mod
    before = mod.prefetch(int(QT.Q4_0), 1)
    mod.set_prefetch(int(QT.Q4_0), 1, 777 if before != 777 else 778)
    before = mod.prefetch(int(QT.Q4_0), 1)
    mod.set_prefetch(int(QT.Q4_K), 1, 384)
    mod.set_prefetch(int(QT.Q4_K), 0, 0)
    assert mod.prefetch(int(QT.Q4_K), 1) == 384
    assert mod.prefetch(int(QT.Q4_K), 0) == 0
    assert mod.prefetch(int(QT.Q4_0), 1) == before  # per type: the others are untouched
    with pytest.raises(ValueError, match="ggml type"):
        mod.set_prefetch(int(QT.F16), 0, 0)
    with pytest.raises(ValueError, match="family"):
        mod.set_prefetch(int(QT.Q4_K), 2, 0)


def test_tuning_writes_a_table_that_loading_applies(path_mod, tmp_path) -> None:
    path, mod = path_mod
    table = tune.tune_prefetch(path, types=["Q4_0", "Q3_K"], rounds=1, total_bytes=4 << 20, directory=tmp_path)
    assert set(table) == {"Q4_0", "Q3_K"}
    assert set(table["Q4_0"]) == {"fp32", "int8"} and set(table["Q3_K"]) == {"fp32"}  # Q3_K: no int8 kernel
    assert all(v in tune.CANDIDATES for row in table.values() for v in row.values())
    stored = json.loads(tune.table_path(mod, tmp_path).read_text())
    assert stored["path"] == path and stored["cpu"] == tune.cpu_signature() and stored["prefetch"] == table
    assert tune.load_prefetch_table(mod, tmp_path) == table
    # applying a table sets exactly its entries
    n = tune.apply_prefetch_table(mod, {"Q4_0": {"fp32": 256, "int8": 2048}, "Q3_K": {"int8": 128},
                                        "NOT_A_TYPE": {"fp32": 1}, "Q8_0": {"bogus": 1}})
    assert n == 3  # unknown types and families are skipped
    assert mod.prefetch(int(QT.Q4_0), 0) == 256 and mod.prefetch(int(QT.Q4_0), 1) == 2048


def test_a_broken_table_is_ignored_with_a_warning(path_mod, tmp_path, caplog) -> None:
    _, mod = path_mod
    tune.table_path(mod, tmp_path).write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert tune.load_prefetch_table(mod, tmp_path) is None
    assert "prefetch table" in caplog.text and "llmopt.kernels.build" in caplog.text
    tune.table_path(mod, tmp_path).write_text(json.dumps({"prefetch": [1, 2]}))
    assert tune.load_prefetch_table(mod, tmp_path) is None
    assert tune.load_prefetch_table(mod, tmp_path / "absent") is None


def test_tuning_an_unknown_path_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown path"):
        tune.tune_prefetch("sse2")


def test_other_load_while_tuning_is_said_and_stored(path_mod, tmp_path, monkeypatch, caplog) -> None:
    """Other processes busy while the table is measured (e.g. a compile on the other core): a warning
    that says to retune, and their load in the stored table; a quiet machine gets none."""
    path, mod = path_mod
    assert tune._others_cores((100.0, 10.0), (103.0, 11.0), 2.0) == 1.0  # 3 s used, 1 s ours, over 2 s
    assert tune._others_cores(None, (1.0, 1.0), 1.0) == 0.0
    for others, warned in ((1000.0, True), (0.0, False)):
        readings = iter([(0.0, 0.0), (others, 0.0)])
        monkeypatch.setattr(tune, "_cpu_seconds", lambda r=readings: next(r))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="llmopt.kernels.tune"):
            tune.tune_prefetch(path, types=["Q8_0"], rounds=1, total_bytes=2 << 20, directory=tmp_path)
        assert ("--retune" in caplog.text) is warned, caplog.text
        stored = json.loads(tune.table_path(mod, tmp_path).read_text())
        assert (stored["others_cores"] > tune.BUSY_CORES) is warned


def test_an_untuned_build_prefetches_the_next_group() -> None:
    """Without a measured table (a build the tuner has not run on, e.g. the AVX2 build forced by
    LLMOPT_CPU_PATH) every type streams with the next-group prefetch, which the tuner chose for every
    type on the CPUs measured (an untuned AVX2 build's Q4_K_M decode step: 7.4 -> 5.2 ms)."""
    import subprocess
    import sys

    if not build.native_enabled() or G.cpu_path() not in G.PATHS:
        pytest.skip("no native GGUF path on this machine")
    code = ("from llmopt.kernels import tune\n"
            "tune.load_prefetch_table = lambda *a, **k: None\n"
            "from llmopt.kernels import gguf_linear as G\n"
            "import gguf\n"
            "m = G.native_module(G.cpu_path())\n"
            "print(sorted({m.prefetch(int(gguf.GGMLQuantizationType[t]), f) for t in G.supported_types() for f in (0, 1)}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"[{tune.GROUP}]"
