"""Build (once per machine) the native AVX2/FMA + OpenMP kernels.

Each native module is a torch C++ extension compiled from ``llmopt/kernels/csrc`` and cached
under ``$LLMOPT_CACHE`` (default ``~/.cache/llmopt``) in a directory named by a hash of what
makes the binary: the sources and headers, the compiler flags, the CPU's instruction-set
features, the torch and Python versions. The sources are copied into that directory and built
from there, so its build files name no checkout: two checkouts with identical sources share one
build instead of rebuilding each other's.

``python -m llmopt.kernels.build`` builds every extension ahead of time (``make setup`` runs it)
and :func:`warm_kernels` loads them all, so no compilation happens inside a request or a timed
case. A build that fails (no compiler, no AVX2) logs one warning and returns ``None``; callers
then use the plain-torch reference of every op.

Set ``LLMOPT_NATIVE=0`` to force the references (the tests do this to check the fallback).
``LLMOPT_W4_PREFETCH`` sets the software prefetch distance of the int4 x int8 kernels in bytes
(default 2048, 0 = off), for experiments.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
_lock = threading.Lock()
_cache: dict[str, ModuleType | None] = {}

CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]
LDFLAGS = ["-fopenmp"]

# Every native extension: name -> its sources in csrc (the kernels' modules load them by these
# names; build_all() and warm_kernels() build and load them all ahead of time).
EXTENSIONS: dict[str, list[str]] = {
    "llmopt_sgemm": ["sgemm.cpp"],
    "llmopt_qgemm": ["qgemm.cpp"],
    "llmopt_fused": ["fused.cpp"],
    "llmopt_decode": ["decode.cpp"],
    "llmopt_kv": ["kv_int8.cpp"],
    "llmopt_quest": ["quest.cpp"],
}

# CPU features that change what the kernels may execute (part of the cache key).
_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl",
              "avx512dq", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8")


def native_enabled() -> bool:
    return os.environ.get("LLMOPT_NATIVE", "1") not in ("0", "false", "no")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty when unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_avx2() -> bool:
    flags = cpu_flags()
    return "avx2" in flags and "fma" in flags


def build_key(name: str, sources: list[str], csrc: Path = CSRC, cflags: list[str] | None = None) -> str:
    """Hash of everything that makes the binary: source and header contents (not their paths),
    compiler and linker flags, the CPU's instruction-set features, torch and Python versions."""
    import torch

    digest = hashlib.sha256()
    headers = sorted(h for h in os.listdir(csrc) if h.endswith(".h"))
    for fname in [*sources, *headers]:
        digest.update(fname.encode() + b"\0" + (csrc / fname).read_bytes() + b"\0")
    isa = sorted(cpu_flags() & set(_ISA_FLAGS))
    for part in (CFLAGS if cflags is None else cflags, LDFLAGS, isa, [torch.__version__, sys.version.split()[0]]):
        digest.update(" ".join(part).encode() + b"\0")
    return f"{name}_{digest.hexdigest()[:16]}"


def _stage_sources(build_dir: Path, sources: list[str], csrc: Path) -> list[str]:
    """Copy the sources and headers into ``build_dir/src`` (atomically, once) and return the
    copies' paths: the build files then name only the cache directory."""
    src = build_dir / "src"
    src.mkdir(parents=True, exist_ok=True)
    headers = sorted(h for h in os.listdir(csrc) if h.endswith(".h"))
    for fname in [*sources, *headers]:
        dest = src / fname
        data = (csrc / fname).read_bytes()
        if dest.exists() and dest.read_bytes() == data:
            continue
        tmp = src / f".{fname}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    return [str(src / s) for s in sources]


def cache_dir() -> Path:
    root = Path(os.environ.get("LLMOPT_CACHE", Path.home() / ".cache" / "llmopt"))
    return root / "torch_extensions"


@contextlib.contextmanager
def _build_dir_lock(build_dir: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the build directory while building or loading it.

    torch's own build lock is a plain file (``build_dir/lock``) that a process killed mid-build
    leaves behind, after which every later process waits on it forever. The ``flock`` dies with
    its process; whoever holds it is the only one that may be building here, so a torch lock file
    found under it is stale and is removed."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / ".llmopt-build.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                log.warning("llmopt: removing a stale build lock left by a killed build: %s", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load_extension(name: str, sources: list[str], cflags: list[str] | None = None,
                   csrc: Path = CSRC) -> ModuleType | None:
    """Compile (once per machine) and import the extension ``name`` built from ``csrc/<sources>``.

    ``cflags`` replaces :data:`CFLAGS` (per-instruction-set builds of one source, e.g. the GGUF
    kernels' AVX-512 variants); the caller must only ask for flags the CPU can run."""
    flags = CFLAGS if cflags is None else cflags
    if not native_enabled():
        return None
    with _lock:
        if name in _cache:
            return _cache[name]
        mod = None
        if not cpu_has_avx2():
            log.warning("llmopt: CPU lacks AVX2/FMA; using plain-torch kernels for %s", name)
        else:
            try:
                from torch.utils.cpp_extension import load

                build_dir = cache_dir() / build_key(name, sources, csrc, flags)
                t0 = time.perf_counter()
                with _build_dir_lock(build_dir):
                    paths = _stage_sources(build_dir, sources, csrc)
                    mod = load(
                        name=name,
                        sources=paths,
                        # copies: torch's load appends its own link flags to the list it is given, which
                        # grew LDFLAGS with every extension loaded, and with it every later build key (an
                        # extension's cache directory depended on what the process had loaded before it)
                        extra_cflags=list(flags),
                        extra_ldflags=list(LDFLAGS),
                        extra_include_paths=[str(build_dir / "src")],
                        build_directory=str(build_dir),
                        verbose=False,
                    )
                log.debug("llmopt: %s ready in %.2fs (%s)", name, time.perf_counter() - t0, build_dir)
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


def warm_kernels() -> dict[str, bool]:
    """Build (if needed) and load every native extension now, so that none is compiled later
    inside a request or a timed case. Returns name -> whether the native module is available
    (all False when ``LLMOPT_NATIVE=0`` or the CPU lacks AVX2)."""
    ready = {name: load_extension(name, sources) is not None for name, sources in EXTENSIONS.items()}
    from . import gguf_linear  # per-instruction-set builds: only the one this CPU will use

    path = gguf_linear.cpu_path()
    ready[f"llmopt_gguf_{path}"] = path != "reference"
    return ready


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


def main(argv: list[str] | None = None) -> int:
    """``python -m llmopt.kernels.build``: build every native extension ahead of time."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llmopt.kernels.build",
                                     description="Build every native kernel extension into the cache now.")
    parser.add_argument("--no-tune", action="store_true",
                        help="skip measuring this CPU's prefetch distances for the GGUF kernels (~1 s per type, "
                             "once per CPU and build; without the table the compiled-in default is used)")
    parser.add_argument("--retune", action="store_true", help="measure the prefetch distances again even if stored")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not native_enabled():
        print("LLMOPT_NATIVE=0: nothing to build (the plain-torch kernels are used)")
        return 0
    t0 = time.perf_counter()
    ready = warm_kernels()
    for name, ok in ready.items():
        print(f"{name}: {'ready' if ok else 'NOT BUILT (plain-torch fallback)'}")
    print(f"cache: {cache_dir()}  ({time.perf_counter() - t0:.1f}s)")
    if not args.no_tune:
        from . import gguf_linear, tune

        path, mod = gguf_linear.native_for()
        if mod is not None and (args.retune or tune.load_prefetch_table(mod) is None):
            t1 = time.perf_counter()
            print(f"measuring the GGUF kernels' prefetch distances on this CPU ({path}, {tune.cpu_model()})")
            tune.tune_prefetch(path, progress=lambda m: print("  " + m, flush=True))
            print(f"prefetch table: {tune.table_path(mod)}  ({time.perf_counter() - t1:.1f}s)")
    return 0 if all(ready.values()) or not cpu_has_avx2() else 1


if __name__ == "__main__":
    raise SystemExit(main())
