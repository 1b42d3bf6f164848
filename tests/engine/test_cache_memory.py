"""The KV cache's memory: zeros of the asked shape and dtype, and 2 MB pages where Linux offers them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from llmopt.engine.runner import cache_zeros
from llmopt.kernels import kv_quant


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, kv_quant.FP8])
@pytest.mark.parametrize("shape", [(2, 3, 16, 1, 8), (3, 5), (4, 64, 16, 2, 64)])
def test_cache_zeros_is_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    t = cache_zeros(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    assert torch.equal(t.float(), torch.zeros(shape))


def _huge_kb_at(addr: int) -> int:
    """AnonHugePages (kB) of the mapping of this process that holds addr."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text[text.index("[") + 1:text.index("]")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_a_large_cache_gets_huge_pages_where_the_kernel_offers_them() -> None:
    mode = _thp_mode()
    if mode not in ("madvise", "always"):
        pytest.skip(f"transparent huge pages are {mode} on this machine")
    t = cache_zeros((8, 64, 16, 4, 64), torch.float32)  # 32 MB
    # advised before the zero fill touched it, so the fill faulted in 2 MB pages (the kernel may
    # still hand out 4 KB ones when memory is fragmented: at least some of the range is huge)
    assert _huge_kb_at(t.data_ptr() + t.numel() * 2) >= 2048
