"""Per-CPU tuning of the GGUF kernels' software prefetch distance, measured once and cached.

Decode streams every weight from DRAM once per token, so a one-row GEMV runs at the memory speed
one core reaches. How far ahead to prefetch by hand depends on the CPU's own prefetchers and on the
type's block layout: on a Zen 4 core (AVX-512 build, int8 activations, a 1536 x 24576 weight > L3)
no software prefetch streamed Q4_1 at 19.5 GB/s vs 15.2 at 1024 bytes ahead and Q4_K at 21.9 vs
15.1, while Q5_0 wanted 128 bytes (22.1 vs 14.5 with none); the same core's AVX2 build streamed Q4_1
fastest at 1024. A model's short panels (K = 576: 18 Q4_1 blocks, 5.8 KB a panel) end before the
hardware prefetcher is up to speed: there prefetching the next group of panels block by block
(candidate -1, "group") streamed a 576 x 1536 Q4_1 weight at 20.5 GB/s vs 14.5 with none (Zen 4,
int8 tiles, 1 thread). No single setting is right, so :func:`tune_prefetch` measures each type's
one-row kernels (fp32 and int8 activations) on this CPU at a few settings and keeps the fastest.

The table is written next to the extension's binary (its build directory: one per source hash,
instruction-set flags and torch version), in a file named after the CPU model, and applied by
:func:`apply_prefetch_table` whenever the extension is loaded. ``python -m llmopt.kernels.build``
(``make setup``) measures it for the path this CPU runs; without a table the compiled-in default
(the next group, ``GROUP``) stays. The distance never changes results, only speed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import gguf
import numpy as np
import torch

log = logging.getLogger(__name__)

QT = gguf.GGMLQuantizationType
GROUP = -1  # the next group of panels instead of a distance (gguf_kernels.h kPrefetchGroup)
CANDIDATES = (0, 128, 256, 512, 1024, 2048, GROUP)  # bytes ahead; 0 = no software prefetch
FAMILIES = {"fp32": 0, "int8": 1}  # register tiles with fp32 / int8 activations
# byte offsets of the fp16 scale fields inside one block, so random blocks decode to finite values
FP16_SCALE_OFFSETS = {QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q8_0: [0], QT.Q2_K: [80, 82],
                 QT.Q3_K: [108], QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208]}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` says)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_signature() -> str:
    """Model name, family and model number of the CPU: virtual machines often report only "AMD
    EPYC", and two generations with the same instruction sets (the build directory's key) can
    need different prefetch distances."""
    fields = {"cpu family": "", "model": ""}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in fields and not fields[key]:
                    fields[key] = line.split(":", 1)[1].strip()
                if not line.strip():
                    break  # the first processor is enough
    except OSError:
        pass
    return f"{cpu_model()} family {fields['cpu family'] or '?'} model {fields['model'] or '?'}"


def table_path(mod: ModuleType, directory: Path | None = None) -> Path:
    """Where the prefetch table of the extension ``mod`` lives on this CPU (``directory``: instead
    of the extension's build directory)."""
    key = hashlib.sha256(cpu_signature().encode()).hexdigest()[:12]
    where = Path(mod.__file__ or ".").resolve().parent if directory is None else Path(directory)
    return where / f"prefetch-{key}.json"


def load_prefetch_table(mod: ModuleType, directory: Path | None = None) -> dict[str, dict[str, int]] | None:
    """The stored table ``{type name: {"fp32": bytes, "int8": bytes}}`` for ``mod`` on this CPU, or
    None (absent or unreadable: a broken file is ignored with a warning, never fatal)."""
    path = table_path(mod, directory)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        table = data["prefetch"]
        if not isinstance(table, dict):
            raise ValueError("'prefetch' is not a mapping")
        return {str(t): {str(f): int(b) for f, b in v.items()} for t, v in table.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("llmopt: ignoring the unreadable prefetch table %s (%s); run `python -m llmopt.kernels.build` "
                    "to measure it again", path, e)
        return None


def apply_prefetch_table(mod: ModuleType, table: dict[str, dict[str, int]]) -> int:
    """Set the extension's per-type distances from ``table``; returns how many were set. Unknown
    types or families are skipped (a table from an older build)."""
    n = 0
    for tname, fams in table.items():
        if tname not in QT.__members__:
            continue
        for fam, nbytes in fams.items():
            if fam in FAMILIES:
                try:
                    mod.set_prefetch(int(gguf.GGMLQuantizationType[tname]), FAMILIES[fam], int(nbytes))
                    n += 1
                except ValueError:  # a type this build has no kernel for
                    pass
    return n


def random_blocks(qt: gguf.GGMLQuantizationType, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[n, bytes_per_row]``: random GGUF blocks of type ``qt`` with finite fp16 scales
    (random codes, scales in [1e-3, 2e-3)): the kernels' speed does not depend on the values."""
    block, size = gguf.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    for off in FP16_SCALE_OFFSETS[qt]:
        v = (1e-3 + 1e-3 * rng.random((n, k // block))).astype(np.float16)
        raw[..., off:off + 2] = v.view(np.uint8).reshape(n, k // block, 2)
    return raw.reshape(n, -1)


def _l3_bytes() -> int:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        return int(text.rstrip("KMG")) * mult
    except (OSError, ValueError, IndexError):
        return 32 << 20


BUSY_CORES = 0.25  # other processes' mean CPU use while tuning above which the table is flagged


def _cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds all processes have used, this process's), from /proc/stat and os.times; None
    where /proc/stat is not there."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
        busy = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except (OSError, ValueError, IndexError):
        return None
    t = os.times()
    return busy, t.user + t.system


def _others_cores(before: tuple[float, float] | None, after: tuple[float, float] | None, wall: float) -> float:
    """Mean number of cores other processes kept busy over ``wall`` seconds (0 if unknown)."""
    if before is None or after is None or wall <= 0:
        return 0.0
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / wall


def _label(pf: int) -> str:
    return "group" if pf == GROUP else str(pf)


def _time_candidates(run: Callable[[], None], set_pf: Callable[[int], None], rounds: int) -> dict[int, float]:
    """Seconds of ``run`` at each candidate distance: interleaved rounds (each candidate once per
    round, so a change of the machine's load hits all alike), the minimum over rounds."""
    best = {pf: float("inf") for pf in CANDIDATES}
    for _ in range(rounds):
        for pf in CANDIDATES:
            set_pf(pf)
            t0 = time.perf_counter()
            run()
            best[pf] = min(best[pf], time.perf_counter() - t0)
    return best


def _tune_type(G: ModuleType, mod: ModuleType, path: str, qt: gguf.GGMLQuantizationType, copies: list,
               fams: dict[str, int], rounds: int, progress: Callable[[str], None] | None) -> dict[str, int]:
    """The fastest candidate per kernel family for one type (left applied on ``mod``)."""
    row: dict[str, int] = {}
    xs = {pk.shape[1]: torch.randn(1, pk.shape[1]) for pk in copies}
    for fam, idx in fams.items():
        def run(fam: str = fam) -> None:
            for pk in copies:
                G.gguf_linear(xs[pk.shape[1]], pk, act=fam, path=path, small_m=4)

        def set_pf(pf: int, idx: int = idx) -> None:
            mod.set_prefetch(int(qt), idx, pf)

        run()  # warm-up: first touch of the copies
        times = _time_candidates(run, set_pf, rounds)
        row[fam] = min(times, key=lambda pf: (times[pf], pf))
        gbs = {pf: sum(c.nbytes for c in copies) / t / 1e9 for pf, t in times.items()}
        msg = f"{path} {qt.name} {fam}: " + " ".join(f"{_label(pf)}:{gbs[pf]:.1f}" for pf in CANDIDATES) \
            + f" GB/s -> {_label(row[fam])}"
        log.debug("llmopt: prefetch %s", msg)
        if progress is not None:
            progress(msg)
        mod.set_prefetch(int(qt), idx, row[fam])
    return row


def tune_prefetch(path: str, types: list[str] | None = None, rounds: int = 5, total_bytes: int | None = None,
                  progress: Callable[[str], None] | None = None,
                  directory: Path | None = None) -> dict[str, dict[str, int]]:
    """Measure the fastest prefetch distance of each type's one-row kernels on ``path`` ("avx2",
    "avx512", "avx512_vnni"), write the table next to the extension and apply it.

    Per type: random weights of K = 576 (a small model's short panels, where the next-group
    prefetch matters) and of K = 1536, ~2.5 MB each, copied in turn until the copies together are
    ``total_bytes`` (default: 2.5x the L3 cache, at least 64 MB), so each call streams from DRAM like
    decode does; one-row calls over all copies at every candidate setting, in interleaved rounds,
    the minimum per candidate. Returns ``{type: {"fp32": bytes, "int8": bytes}}``; ~1 s per type.
    ``directory``: write the table there instead of the extension's build directory (tests)."""
    from . import gguf_linear as G

    if path not in G.PATHS:
        raise ValueError(f"unknown path {path!r}; choose one of {', '.join(G.PATHS)}")
    mod = G.native_module(path)
    if mod is None:
        raise RuntimeError(f"the {path} GGUF kernels are not available on this machine (CPU or build)")
    names = types or G.supported_types()
    total = total_bytes or max(64 << 20, int(2.5 * _l3_bytes()))
    rng = np.random.default_rng(0)
    table: dict[str, dict[str, int]] = {}
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # one core's stream: what each decode thread sees
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    try:
        for name in names:
            qt = gguf.GGMLQuantizationType[name]
            block, size = gguf.GGML_QUANT_SIZES[qt]
            firsts = []
            for k in (576, 1536):  # as many bytes of each, in weights of ~2.5 MB (K = 576 of Q6_K / Q4_K:
                # 768, the next multiple of their 256-wide blocks)
                k = -(-k // block) * block
                n = max(16, (5 << 19) // (k // block * size) // 16 * 16)
                firsts.append(G.pack_gguf(random_blocks(qt, n, k, rng), qt, (n, k)))
            copies: list = []
            while sum(c.nbytes for c in copies) < total or len(copies) < 2:
                f = firsts[len(copies) % 2]
                copies.append(f if len(copies) < 2 else G.GGUFPacked(f.ggml_type, f.shape, f.data.clone()))
            fams = {"fp32": 0} | ({"int8": 1} if name in G.supported_types("int8") else {})
            table[name] = _tune_type(G, mod, path, qt, copies, fams, rounds, progress)
            del copies, firsts
    finally:
        torch.set_num_threads(saved)
    # other work on the machine while measuring (a compile on the other core made this pick settings
    # 10-25% slower than on a quiet machine): said, and kept in the table
    others = _others_cores(cpu0, _cpu_seconds(), time.perf_counter() - wall0)
    if others > BUSY_CORES:
        msg = (f"other processes kept {others:.1f} cores busy while the {path} prefetch table was measured: it may "
               "be off; run `python -m llmopt.kernels.build --retune` on a quiet machine")
        log.warning("llmopt: %s", msg)
        if progress is not None:
            progress(f"warning: {msg}")
    out = table_path(mod, directory)
    data = {"cpu": cpu_signature(), "path": path, "candidates": list(CANDIDATES), "measured": time.strftime("%Y-%m-%d"),
            "others_cores": round(others, 2), "prefetch": table}
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, out)
    return table
