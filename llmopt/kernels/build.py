"""Build-on-first-use for the native AVX2/FMA + OpenMP kernels.

Each native module is a torch C++ extension compiled from ``llmopt/kernels/csrc`` the first time
it is needed and cached under ``$LLMOPT_CACHE`` (default ``~/.cache/llmopt``) keyed by the source
hash, so later imports are instant. A build that fails (no compiler, no AVX2) logs one warning
and returns ``None``; callers then use the plain-torch reference of every op.

Set ``LLMOPT_NATIVE=0`` to force the references (the tests do this to check the fallback).
``LLMOPT_W4_PREFETCH`` sets the software prefetch distance of the int4 x int8 kernels in bytes
(default 2048, 0 = off), for experiments.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
_lock = threading.Lock()
_cache: dict[str, ModuleType | None] = {}

CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]


def native_enabled() -> bool:
    return os.environ.get("LLMOPT_NATIVE", "1") not in ("0", "false", "no")


def cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return " avx2" in flags and " fma" in flags
    except OSError:
        return False


def cache_dir() -> Path:
    root = Path(os.environ.get("LLMOPT_CACHE", Path.home() / ".cache" / "llmopt"))
    return root / "torch_extensions"


def load_extension(name: str, sources: list[str]) -> ModuleType | None:
    """Compile (once) and import the extension ``name`` built from ``csrc/<sources>``."""
    if not native_enabled():
        return None
    with _lock:
        if name in _cache:
            return _cache[name]
        mod = None
        if not cpu_has_avx2():
            log.warning("llmopt: CPU lacks AVX2/FMA; using plain-torch kernels for %s", name)
        else:
            paths = [str(CSRC / s) for s in sources]
            digest = hashlib.sha1()
            for p in paths + [str(CSRC / h) for h in sorted(os.listdir(CSRC)) if h.endswith(".h")]:
                digest.update(Path(p).read_bytes())
            digest.update(" ".join(CFLAGS).encode())
            build_dir = cache_dir() / f"{name}_{digest.hexdigest()[:12]}"
            build_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.cpp_extension import load

                mod = load(
                    name=name,
                    sources=paths,
                    extra_cflags=CFLAGS,
                    extra_ldflags=["-fopenmp"],
                    extra_include_paths=[str(CSRC)],
                    build_directory=str(build_dir),
                    verbose=False,
                )
            except Exception as e:  # any build failure means "use the reference"
                log.warning("llmopt: native build of %s failed (%s); using plain-torch kernels", name,
                            str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
                mod = None
        pf = os.environ.get("LLMOPT_W4_PREFETCH")
        if mod is not None and hasattr(mod, "_set_w4_prefetch") and pf:  # experiments: bytes ahead, 0 = off
            if pf.isdigit():
                mod._set_w4_prefetch(int(pf))
            else:
                log.warning("llmopt: LLMOPT_W4_PREFETCH=%r is not a whole number of bytes; keeping the default", pf)
        _cache[name] = mod
        return mod


def extension_loader(name: str, sources: list[str]) -> Callable[[], ModuleType | None]:
    """A function returning the extension ``name`` (or ``None``), built / looked up by
    :func:`load_extension` on its first call only. The answer is kept, so later calls (the kernels'
    hot paths) neither take the build lock nor read ``LLMOPT_NATIVE`` again."""
    mod: ModuleType | None = None
    loaded = False

    def native() -> ModuleType | None:
        nonlocal mod, loaded
        if not loaded:
            mod = load_extension(name, sources)
            loaded = True
        return mod

    return native
