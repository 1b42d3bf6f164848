"""The paged walks' read-ahead survives the compiler.

GCC treats ``_mm_prefetch`` as free of side effects, so a function whose body only prefetches is
found ``const`` and every call to it is deleted: that silently removed the Quest walk's and the 8-bit
walk's prefetches once. The cache views' ``prefetch_block`` (what every walk calls) must compile to
prefetch instructions with the flags the extensions are built with.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from llmopt.kernels.build import CFLAGS, CSRC

SOURCE = """
#include "kv_int8.h"
void f32(const llmopt_f::PagedKV& kv, int64_t j, int64_t n, int64_t D) { kv.prefetch_block(j, n, D); }
void f8(const llmopt_kv8::PagedKV8& kv, int64_t j, int64_t n, int64_t D) { kv.prefetch_block(j, n, D); }
void f16(const llmopt_f::PagedKV16& kv, int64_t j, int64_t n, int64_t D) { kv.prefetch_block(j, n, D); }
void next32(const llmopt_f::PagedKV& kv, int64_t j, int64_t s, int64_t e, int64_t D) {
  llmopt_f::prefetch_next_block(kv, j, s, e, D);
}
"""


def _prefetches_by_function(obj: Path) -> dict[str, int]:
    out = subprocess.run(["objdump", "-d", "-C", str(obj)], check=True, capture_output=True, text=True).stdout
    counts: dict[str, int] = {}
    name = ""
    for line in out.splitlines():
        if line.endswith(">:") and "<" in line:
            name = line[line.index("<") + 1:line.index("(") if "(" in line else -2]
            counts[name] = 0
        elif name and "prefetcht0" in line:
            counts[name] += 1
    return counts


@pytest.mark.skipif(shutil.which("g++") is None or shutil.which("objdump") is None, reason="needs g++ and objdump")
def test_prefetch_only_functions_keep_their_prefetches(tmp_path: Path) -> None:
    src = tmp_path / "pf.cpp"
    src.write_text(SOURCE)
    obj = tmp_path / "pf.o"
    flags = [f for f in CFLAGS if f != "-fopenmp"]
    subprocess.run(["g++", *flags, "-std=c++17", f"-I{CSRC}", "-c", str(src), "-o", str(obj)], check=True)
    counts = _prefetches_by_function(obj)
    for fn in ("f32", "f8", "f16", "next32"):
        assert counts.get(fn, 0) > 0, f"{fn}: the compiler dropped the prefetches ({counts})"
