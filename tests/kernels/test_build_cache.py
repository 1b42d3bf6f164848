"""The kernel build cache is shared by checkouts with identical sources: the build directory is
named by what makes the binary (not where the sources live) and builds from its own copy of them."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmopt.kernels.build import build_key, cpu_has_avx2

REPO = Path(__file__).resolve().parents[2]

# A plain CPython extension (no torch headers): compiles in well under a second, yet goes through
# the same load_extension -> torch cpp_extension -> ninja path as the real kernels.
TINY_CPP = r"""
#include <Python.h>
#include "tiny.h"
static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(TINY_ANSWER); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, ""}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "llmopt_tiny", NULL, -1, methods};
PyMODINIT_FUNC PyInit_llmopt_tiny(void) { return PyModule_Create(&mod); }
"""

LOAD = (
    "import sys\n"
    "from pathlib import Path\n"
    "from llmopt.kernels.build import load_extension\n"
    "m = load_extension('llmopt_tiny', ['tiny.cpp'], csrc=Path(sys.argv[1]))\n"
    "print(m.answer())\n"
)


def _checkout(root: Path, answer: int = 42) -> Path:
    csrc = root / "llmopt" / "kernels" / "csrc"
    csrc.mkdir(parents=True)
    (csrc / "tiny.cpp").write_text(TINY_CPP)
    (csrc / "tiny.h").write_text(f"#define TINY_ANSWER {answer}\n")
    return csrc


def _load(csrc: Path, cache: Path) -> str:
    env = {**os.environ, "LLMOPT_CACHE": str(cache), "LLMOPT_NATIVE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", LOAD, str(csrc)], capture_output=True, text=True,
                          env=env, cwd=csrc, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _builds(cache: Path) -> dict[str, tuple[int, int]]:
    """build dir -> (number of ninja build records, mtime of the built module)."""
    out = {}
    for d in (cache / "torch_extensions").iterdir():
        log = d / ".ninja_log"
        records = [ln for ln in log.read_text().splitlines() if not ln.startswith("#")]
        out[d.name] = (len(records), (d / "llmopt_tiny.so").stat().st_mtime_ns)
    return out


@pytest.mark.skipif(shutil.which("c++") is None or not cpu_has_avx2(), reason="needs a compiler and AVX2")
def test_two_checkouts_with_identical_sources_share_one_build(tmp_path):
    cache = tmp_path / "cache"
    first, second = _checkout(tmp_path / "a"), _checkout(tmp_path / "b")
    assert _load(first, cache) == "42"
    built = _builds(cache)
    assert len(built) == 1 and next(iter(built.values()))[0] >= 2  # compiled + linked
    assert _load(second, cache) == "42"
    assert _builds(cache) == built, "the second checkout rebuilt the extension"
    build_dir = cache / "torch_extensions" / next(iter(built))
    ninja = (build_dir / "build.ninja").read_text()
    assert str(tmp_path / "a") not in ninja and str(tmp_path / "b") not in ninja
    assert str(build_dir / "src" / "tiny.cpp") in ninja


def test_build_key_depends_on_contents_not_location(tmp_path):
    a, b = _checkout(tmp_path / "a"), _checkout(tmp_path / "b")
    assert build_key("llmopt_tiny", ["tiny.cpp"], a) == build_key("llmopt_tiny", ["tiny.cpp"], b)
    (b / "tiny.h").write_text("#define TINY_ANSWER 43\n")
    assert build_key("llmopt_tiny", ["tiny.cpp"], a) != build_key("llmopt_tiny", ["tiny.cpp"], b)


@pytest.mark.skipif(shutil.which("c++") is None or not cpu_has_avx2(), reason="needs a compiler and AVX2")
def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_one(tmp_path):
    cache = tmp_path / "cache"
    csrc = _checkout(tmp_path / "a", answer=7)
    assert _load(csrc, cache) == "7"
    build_dir = cache / "torch_extensions" / next(iter(_builds(cache)))
    # what torch's file lock looks like after its holder was killed mid-build; without recovery the
    # next build waits on it forever (the subprocess timeout would fail this test)
    (build_dir / "lock").write_text("")
    (build_dir / "llmopt_tiny.so").unlink()  # force a rebuild, which takes torch's lock
    assert _load(csrc, cache) == "7"
    assert not (build_dir / "lock").exists()


LOAD_TWO = (
    "import sys\n"
    "from pathlib import Path\n"
    "from llmopt.kernels import build\n"
    "csrc = Path(sys.argv[1])\n"
    "before = (list(build.CFLAGS), list(build.LDFLAGS), build.build_key('llmopt_tiny2', ['tiny2.cpp'], csrc))\n"
    "assert build.load_extension('llmopt_tiny', ['tiny.cpp'], csrc=csrc).answer() == 42\n"
    "after = (list(build.CFLAGS), list(build.LDFLAGS), build.build_key('llmopt_tiny2', ['tiny2.cpp'], csrc))\n"
    "print(before == after, after[1])\n"
)


@pytest.mark.skipif(shutil.which("c++") is None or not cpu_has_avx2(), reason="needs a compiler and AVX2")
def test_a_build_key_does_not_depend_on_what_was_loaded_before(tmp_path):
    """torch's load appends its link flags to the lists it is given; if those were the module's own
    flag lists, every later build key changed with each extension loaded (rebuilds in every process
    that loads the extensions in another order)."""
    csrc = _checkout(tmp_path / "a")
    (csrc / "tiny2.cpp").write_text(TINY_CPP)
    env = {**os.environ, "LLMOPT_CACHE": str(tmp_path / "cache"), "LLMOPT_NATIVE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", LOAD_TWO, str(csrc)], capture_output=True, text=True, env=env,
                          cwd=csrc, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("True"), done.stdout
