"""The performance grid behind ``llmopt bench``: concurrency x input length x output length, llmopt
against the unoptimized original, side by side in one run.

Method (the numbers mean exactly this):

- Prompts are seeded random token ids of exactly ``input_len`` tokens; every system gets the same
  prompts. Each repeat (and the warmup) draws fresh prompts, so no prefix cache can reuse them.
- Closed loop: all ``concurrency`` requests of a cell arrive together at ``t0``; the run ends when
  the last one has ``output_len`` tokens. Decoding is greedy with EOS ignored (neither a stop nor
  masked), so every request produces exactly ``output_len`` tokens in every system.
- ``output_tokens_per_s`` = concurrency x output_len / (end - t0): end-to-end, prefill included.
- TTFT = time of a request's first token - t0. TPOT = (last token - first token) / (tokens - 1),
  per request; p50/p90 are over all requests of all repeats. ``stream_decode_tokens_per_s`` is
  1 / TPOT p50: the decode speed one stream sees.
- Peak memory is the RSS high-water mark (``VmHWM``) of the process that runs only that system,
  reset just before each measured run (``/proc/self/clear_refs``), so it covers weights, runtime,
  KV cache and activations of that run. Where the reset is not allowed it is the process-lifetime
  peak (``peak_rss_scope`` says which).
- Each system lives in its own worker process (loaded once, then given one cell at a time); the
  workers never compute at the same time. Within a cell, each repeat runs every system once and the
  order alternates between repeats, so background load falls on both sides alike.
- ``cpu_ms_per_output_token`` = CPU time (user + system, all threads) of the system's process over
  the run / output tokens. It hardly depends on other load, so on a shared machine it is the
  steadier comparison — cleanest at one thread, since idle OpenMP threads spin and count as CPU.
- A warmup run (same shape, ``WARMUP_TOKENS`` output tokens, its own prompts) precedes every cell.
- ``prefill_tokens_per_s`` = concurrency x input_len / (time the last request got its first token -
  t0), median over runs: prompt throughput. At concurrency 1, input 512, output 1 it is the figure
  llama.cpp's ``llama-bench`` calls pp512 (one 512-token prompt, one 512-token batch).
- Peers (``--peer llamacpp``: llama.cpp on the same GGUF file) run under the same rules in their
  own process. Their arithmetic differs (llama.cpp multiplies quantized weights with quantized
  activations), so their greedy tokens are recorded but their agreement with the reference is not
  a correctness check: the table shows ``n/a`` there.
- Ratios compare each system with the reference (transformers when run, else llmopt fp32):
  ``output_tokens_per_s_x`` and ``prefill_tokens_per_s_x`` = system / reference (higher is
  better); ``ttft_p50_speedup_x``,
  ``tpot_p50_speedup_x`` and ``cpu_per_token_speedup_x`` = reference / system (higher is better);
  ``peak_rss_x`` = system / reference (lower is better).

The workers import torch; this module does not at import time, so the coordinating process stays
light. ``run_grid`` returns the JSON-ready result; ``markdown_table`` renders it for a README.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
WARMUP_TOKENS = 4
LLMOPT = "llmopt"
TRANSFORMERS = "transformers"
LLAMACPP = "llama.cpp"
BASELINES = ("hf", "none")
PEERS = {"llamacpp": LLAMACPP}  # --peer value -> system name


# ---- the grid ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    concurrency: int
    input_len: int
    output_len: int

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.input_len < 1 or self.output_len < 1:
            raise ValueError(f"a bench cell needs concurrency, input_len and output_len >= 1, got {self}")


@dataclass
class GridConfig:
    model: str = DEFAULT_MODEL
    cells: list[Cell] = field(default_factory=lambda: [Cell(1, 128, 128)])
    threads: int = 2
    baseline: str = "hf"  # hf: transformers generate on the same weights; none: llmopt only
    quants: list[str] = field(default_factory=list)  # extra llmopt systems, e.g. ["int8", "int4"]
    peers: list[str] = field(default_factory=list)  # other engines on the same model, e.g. ["llamacpp"]
    repeat: int = 1
    warmup: bool = True
    seed: int = 0
    # extra environment for one system's worker process, e.g. {"llmopt[gguf]": {"LLMOPT_FUSED_DECODE": "0"}}
    system_env: dict[str, dict[str, str]] = field(default_factory=dict)
    kv_dtype: str | None = None  # every llmopt row's KV cache type (EngineConfig.kv_dtype; None: the model's dtype)
    # one llmopt row's KV cache type instead, e.g. {"llmopt[gguf]": "float16"}
    system_kv_dtype: dict[str, str] = field(default_factory=dict)
    # every system's bits per weight and held-out perplexity (the same token ids for all), once per run
    quality: bool = True

    def __post_init__(self) -> None:
        if not self.cells:
            raise ValueError("the bench grid is empty: give at least one concurrency, input and output length")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.repeat < 1 or self.threads < 1:
            raise ValueError("repeat and threads must be >= 1")
        for q in self.quants:
            if not q or q == "none":
                raise ValueError(f"--quant lists extra llmopt rows next to the default one (e.g. fp32,int8,int4), "
                                 f"got {q!r}")
        for peer in self.peers:
            if peer not in PEERS:
                raise ValueError(f"unknown --peer {peer!r}; known: {', '.join(PEERS)}")
        for kv in [self.kv_dtype, *self.system_kv_dtype.values()]:
            if kv is not None:
                from llmopt.config import EngineConfig

                EngineConfig(kv_dtype=kv)  # a bad type: ValueError naming the ones there are, before any load

    @property
    def systems(self) -> list[str]:
        """System names in run order: llmopt (the model as stored: fp32, or a GGUF file's own blocks),
        llmopt[quant]..., the peers, then the baseline."""
        names = [LLMOPT] + [f"{LLMOPT}[{q}]" for q in self.quants] + [PEERS[p] for p in self.peers]
        return names + ([TRANSFORMERS] if self.baseline == "hf" else [])

    @property
    def reference(self) -> str:
        return TRANSFORMERS if self.baseline == "hf" else LLMOPT


def parse_int_list(text: str, what: str) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]`` (a clear error names the option on bad input)."""
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"{what} takes comma-separated positive integers like 1,4,16, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what} takes comma-separated positive integers like 1,4,16, got {text!r}")
    return list(dict.fromkeys(values))


def product_cells(concurrency: list[int], input_lens: list[int], output_lens: list[int]) -> list[Cell]:
    return [Cell(c, i, o) for i in input_lens for o in output_lens for c in concurrency]


def random_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """``n`` prompts of exactly ``length`` token ids drawn uniformly from the vocabulary."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(length)] for _ in range(n)]


def _prompt_seed(seed: int, cell: Cell, run: int) -> int:
    """Distinct per (cell, run): run -1 is the warmup."""
    return hash((seed, cell.concurrency, cell.input_len, cell.output_len, run)) & 0x7FFF_FFFF


def kv_blocks_needed(cells: list[Cell], block_size: int = 16) -> int:
    """KV blocks the largest cell needs: the llmopt engine is sized to the grid (plus one spare block
    per sequence), not to its 2 GiB default, so that its RSS is not dominated by an idle cache."""
    return max(c.concurrency * (math.ceil((c.input_len + c.output_len) / block_size) + 1) for c in cells)


# ---- memory ------------------------------------------------------------------------------------
def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0). False if not allowed here.

    Garbage left by loading (freed but still mapped by the allocator: with quantize-on-load several
    hundred MB, and how much of it glibc keeps varies from run to run) is collected and handed back
    to the OS first, so the mark measures what the run needs (the same int4 run measured 550-974 MB
    without this)."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """RSS high-water mark of this process (since the last reset, where resets work)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return kb * 1024


def _cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---- one run of one cell -----------------------------------------------------------------------
@dataclass
class RunTrace:
    """Raw timings of one closed-loop run: all requests arrived at ``t0`` (perf_counter seconds)."""

    t0: float
    t_end: float
    token_ids: list[list[int]]  # per request
    token_times: list[list[float]]  # per request, one timestamp per generated token
    peak_rss_bytes: int
    peak_rss_scope: str  # "run" (reset before the run) or "process" (lifetime peak)
    cpu_seconds: float = 0.0  # user + system CPU time of the worker process during the run (all threads)
    extra: dict[str, Any] = field(default_factory=dict)


# what a system's ``run`` returns: (t0, t_end, token ids per request, token times per request, extras)
RunResult = tuple[float, float, list[list[int]], list[list[float]], dict[str, Any]]


class LLMOptSystem:
    """llmopt's ``LLMEngine`` driven the way a server drives it: add every request, step until done."""

    def __init__(self, model: str, threads: int, quant: str | None = None, num_kv_blocks: int | None = None,
                 max_num_seqs: int = 64, kv_dtype: str | None = None):
        from llmopt.config import EngineConfig
        from llmopt.engine.engine import LLMEngine
        from llmopt.kernels import ops

        cfg = EngineConfig(num_threads=threads, num_kv_blocks=num_kv_blocks, max_num_seqs=max_num_seqs,
                           kv_dtype=kv_dtype)
        self.engine = LLMEngine(model, cfg, quant=quant)
        self.vocab_size = self.engine.model_config.vocab_size
        self.info = {"engine_config": asdict(cfg), "quant": quant, "kv_dtype": kv_dtype,
                     "native_kernels": ops.native_available(),
                     "source": str(self.engine.loaded.source), "load_seconds": self.engine.loaded.load_seconds}
        self._n = 0

    def run(self, prompts: list[list[int]], output_len: int) -> RunResult:
        from llmopt import SamplingParams

        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        eng = self.engine
        hits0, steps0 = eng.block_manager.prefix_hit_tokens, eng.stats["steps"]
        t0 = time.perf_counter()
        seqs = []
        for p in prompts:
            self._n += 1
            seqs.append(eng.add_request(p, params, request_id=f"bench-{self._n}"))
        while eng.has_unfinished():
            eng.step()
        t_end = time.perf_counter()
        extra = {"prefix_cache_hit_tokens": eng.block_manager.prefix_hit_tokens - hits0,
                 "engine_steps": eng.stats["steps"] - steps0,
                 "preemptions": sum(s.num_preemptions for s in seqs)}
        return t0, t_end, [list(s.output_ids) for s in seqs], [list(s.token_times) for s in seqs], extra

    def heldout_ids(self, max_tokens: int) -> list[list[int]]:
        from llmopt.quant.calib import heldout_token_ids

        return heldout_token_ids(self.engine.tokenizer, max_tokens)

    def quality(self, id_lists: list[list[int]]) -> dict[str, Any]:
        from llmopt.quant.calib import score_token_ids
        from llmopt.tasks.evaluate import linear_bits_per_weight

        # a KV cache in another type than the activations changes what attention reads: scored through it
        through = None if self.engine.config.kv_dtype is None else (lambda _model, ids: self.engine.score(list(ids)))
        nll, n = score_token_ids(self.engine.model, id_lists, through)
        return quality_record(linear_bits_per_weight(self.engine.model), nll, n)


def quality_record(bits_per_weight: float | None, nll: float, tokens: int) -> dict[str, Any]:
    """What a system's ``quality`` returns: bits per weight of its linear layers as it holds them (output
    head left out) and its perplexity over the held-out token ids it was given."""
    return {"bits_per_weight": None if bits_per_weight is None else round(bits_per_weight, 4),
            "heldout_ppl": round(math.exp(nll / tokens), 4) if tokens else None, "heldout_tokens": tokens}


def _make_system(kind: str, kwargs: dict[str, Any]) -> Any:
    if kind == LLMOPT:
        return LLMOptSystem(**kwargs)
    if kind == TRANSFORMERS:
        from llmopt.bench.baselines import TransformersSystem

        return TransformersSystem(**kwargs)
    raise ValueError(f"unknown bench system {kind!r}")


def _worker_main(conn: Any, kind: str, kwargs: dict[str, Any]) -> None:
    """Body of a spawned worker process: load one system, then run the cells the coordinator sends."""
    serve(conn, lambda: _make_system(kind, kwargs))


def serve(conn: Any, make_system: Callable[[], Any]) -> None:
    """The worker protocol, over a ``multiprocessing`` connection: ``("ready", info)`` once the
    system is loaded, then ``("ok", RunTrace as a dict)`` per ``("run", prompts, output_len)``
    until ``("stop",)``; ``("error", text)`` instead on failure. Plain data only, so a worker that
    loaded this file without the ``llmopt`` package (the llama.cpp one) speaks it too."""
    try:
        system = make_system()
        conn.send(("ready", {"vocab_size": system.vocab_size, **system.info}))
    except BaseException as e:  # reported to the coordinator, which raises
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            if hasattr(system, "close"):
                system.close()  # native resources in order (llama.cpp: contexts before the model)
            return
        if msg[0] in ("quality", "heldout_ids"):  # one answer, plain data (see quality_of)
            try:
                conn.send(("ok", getattr(system, msg[0])(*msg[1:])))
            except BaseException as e:
                conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
            continue
        _, prompts, output_len = msg
        try:
            can_reset = reset_peak_rss()
            cpu0 = _cpu_seconds()
            t0, t_end, ids, times, extra = system.run(prompts, output_len)
            trace = RunTrace(t0, t_end, ids, times, peak_rss_bytes(), "run" if can_reset else "process",
                             _cpu_seconds() - cpu0, extra)
            conn.send(("ok", asdict(trace)))
        except BaseException as e:
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class _Subprocess:
    """A ``subprocess.Popen`` with the part of ``multiprocessing.Process`` that ``Worker`` uses."""

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        self.popen.terminate()

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()


class Worker:
    """One system in its own process (spawned, so it shares no torch state with anything else).

    The llama.cpp peer runs ``llamacpp.py`` as a plain script instead: a spawned worker imports the
    ``llmopt`` package, and with it torch (~250 MB RSS that would be charged to llama.cpp)."""

    def __init__(self, name: str, kind: str, kwargs: dict[str, Any], threads: int,
                 extra_env: dict[str, str] | None = None):
        import multiprocessing as mp

        self.name = name
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
               **(extra_env or {})}
        if kind == LLAMACPP:
            self._start_script(kind, kwargs, env)
            return
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # inherited by the child at spawn, before it imports torch
        try:
            self.proc = ctx.Process(target=_worker_main, args=(child, kind, kwargs), name=f"bench-{name}", daemon=True)
            self.proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        self._wait_ready()

    def _start_script(self, kind: str, kwargs: dict[str, Any], env: dict[str, str]) -> None:
        import json
        import socket
        from multiprocessing.connection import Connection

        script = Path(__file__).with_name("llamacpp.py")
        ours, theirs = socket.socketpair()
        try:
            popen = subprocess.Popen([sys.executable, str(script), str(theirs.fileno()), json.dumps(kwargs)],
                                     pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env={**os.environ, **env})
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.proc = _Subprocess(popen)
        self._wait_ready()

    def _wait_ready(self) -> None:
        try:
            self.info = self._recv()
        except BaseException:
            self.close()
            raise

    def _recv(self) -> Any:
        try:
            status, payload = self.conn.recv()
        except (EOFError, ConnectionError):
            self.proc.join(5)
            code = self.proc.exitcode
            hint = ("killed, most likely out of memory: try a smaller grid" if code is not None and code < 0 else
                    "its error is on stderr above; a script that calls run_grid needs an "
                    "`if __name__ == '__main__':` guard (workers are spawned)")
            raise RuntimeError(f"the {self.name} bench worker exited (code {code}) before answering: {hint}") from None
        if status == "error":
            first = payload.splitlines()[0]
            log.debug("%s worker traceback:\n%s", self.name, payload)
            raise RuntimeError(f"{self.name}: {first}")
        return payload

    def run(self, prompts: list[list[int]], output_len: int) -> RunTrace:
        self.conn.send(("run", prompts, output_len))
        return RunTrace(**self._recv())

    def heldout_ids(self, max_tokens: int) -> list[list[int]]:
        self.conn.send(("heldout_ids", max_tokens))
        return self._recv()

    def quality(self, id_lists: list[list[int]]) -> dict[str, Any]:
        self.conn.send(("quality", id_lists))
        return self._recv()

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(30)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(5)
        self.conn.close()


# ---- metrics -----------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000.0 * x, 3)


def summarize(traces: list[RunTrace], cell: Cell) -> dict[str, Any]:
    """Metrics of one system on one cell, over its measured runs."""
    tps, walls, ttft, tpot, e2e, prefill = [], [], [], [], [], []
    for t in traces:
        n_out = sum(len(ids) for ids in t.token_ids)
        wall = t.t_end - t.t0
        walls.append(wall)
        tps.append(n_out / wall)
        prefill.append(len(t.token_times) * cell.input_len / (max(times[0] for times in t.token_times) - t.t0))
        for times in t.token_times:
            ttft.append(times[0] - t.t0)
            e2e.append(times[-1] - t.t0)
            if len(times) > 1:
                tpot.append((times[-1] - times[0]) / (len(times) - 1))
    tpot50 = percentile(tpot, 50)
    out = {
        "output_tokens_per_s": round(statistics.median(tps), 3),
        "output_tokens_per_s_runs": [round(x, 3) for x in tps],
        "output_tokens_per_s_stdev": round(statistics.stdev(tps), 3) if len(tps) > 1 else None,
        "stream_decode_tokens_per_s": round(1.0 / tpot50, 3) if tpot50 else None,
        "prefill_tokens_per_s": round(statistics.median(prefill), 3),
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p90_ms": _ms(percentile(ttft, 90)),
        "tpot_p50_ms": _ms(tpot50),
        "tpot_p90_ms": _ms(percentile(tpot, 90)),
        "latency_p50_ms": _ms(percentile(e2e, 50)),
        "latency_p90_ms": _ms(percentile(e2e, 90)),
        "wall_s": round(statistics.median(walls), 4),
        "output_tokens": sum(len(ids) for ids in traces[0].token_ids),
        "cpu_ms_per_output_token": round(1000.0 * sum(t.cpu_seconds for t in traces)
                                         / sum(len(ids) for t in traces for ids in t.token_ids), 3),
        "peak_rss_mb": round(max(t.peak_rss_bytes for t in traces) / 2**20, 1),
        "peak_rss_scope": traces[0].peak_rss_scope,
    }
    bad = [len(ids) for t in traces for ids in t.token_ids if len(ids) != cell.output_len]
    if bad:
        raise RuntimeError(f"a request produced {bad[0]} tokens instead of {cell.output_len}: the bench "
                           "needs fixed-length outputs")
    extras = [t.extra for t in traces if t.extra]
    for key in sorted({k for e in extras for k in e}):
        out[key] = sum(e.get(key, 0) for e in extras)
    return out


def compare_tokens(a: list[list[list[int]]], b: list[list[list[int]]]) -> dict[str, Any]:
    """Greedy-token agreement of two systems over the same prompts (lists of runs of requests)."""
    total = same = 0
    first_diff: list[int] = []
    for run_a, run_b in zip(a, b):
        for x, y in zip(run_a, run_b):
            total += 1
            if x == y:
                same += 1
            else:
                first_diff.append(next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y))))
    return {"requests": total, "identical": same, "all_identical": same == total,
            "first_divergence_min": min(first_diff) if first_diff else None}


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return round(num / den, 3)


def ratios(system: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    return {
        "output_tokens_per_s_x": _ratio(system["output_tokens_per_s"], ref["output_tokens_per_s"]),
        "stream_decode_tokens_per_s_x": _ratio(system["stream_decode_tokens_per_s"], ref["stream_decode_tokens_per_s"]),
        "prefill_tokens_per_s_x": _ratio(system["prefill_tokens_per_s"], ref["prefill_tokens_per_s"]),
        "ttft_p50_speedup_x": _ratio(ref["ttft_p50_ms"], system["ttft_p50_ms"]),
        "tpot_p50_speedup_x": _ratio(ref["tpot_p50_ms"], system["tpot_p50_ms"]),
        "cpu_per_token_speedup_x": _ratio(ref["cpu_ms_per_output_token"], system["cpu_ms_per_output_token"]),
        "peak_rss_x": _ratio(system["peak_rss_mb"], ref["peak_rss_mb"]),
    }


# ---- machine -----------------------------------------------------------------------------------
def _cpu_flags() -> dict[str, bool]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return {}
    return {k: k in flags for k in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "amx_tile")}


def _git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        # --no-optional-locks: read-only, never refreshes the index
        status = subprocess.run(["git", "--no-optional-locks", "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True, timeout=10)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def kernel_info() -> dict[str, Any]:
    """Which GGUF kernel build runs here (instruction set), whether this CPU's measured prefetch
    table is in use (``python -m llmopt.kernels.build``) or the compiled-in default, and whether the
    GGUF mode's prompt rows (``LLMOPT_GGUF_ACT``, by default by-kind) run on AMX-BF16 tiles (``bf16x3``: available here and not turned
    off) or with int16 activations (where faster, or as ``LLMOPT_GGUF_PROMPT_INT16`` says)."""
    from llmopt.config import KernelSettings
    from llmopt.kernels import gguf_linear, tune
    from llmopt.models import gguf_linear as gguf_layers

    path, mod = gguf_linear.native_for()
    table = tune.load_prefetch_table(mod) if mod is not None else None
    ks = KernelSettings.from_env()
    prompt = gguf_layers.prompt_act(ks.gguf_act, ks.gguf_bf16x3, ks.gguf_prompt_int16) if mod is not None else "fp32"
    return {"gguf_path": path, "prefetch": "measured" if table else "default", "prompt_bf16x3": prompt == "bf16x3",
            "prompt_int16": prompt == "int16"}


def machine_info(threads: int) -> dict[str, Any]:
    from llmopt.config import usable_cpus
    from llmopt.kernels.tune import cpu_model

    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "kernels": kernel_info(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "threads": threads,
        "memory_gib": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "llmopt": _version("llmopt"),
        "git": _git_commit(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


# ---- the run -----------------------------------------------------------------------------------
def peer_problems(peers: list[str], model: str) -> dict[str, str]:
    """System name -> why that peer cannot run here (not installed, model not a GGUF file); the grid
    skips those peers and says so."""
    out = {}
    for peer in peers:
        if PEERS.get(peer) == LLAMACPP:
            from llmopt.bench.llamacpp import missing_reason, resolve_gguf

            why = missing_reason()
            if why is None:
                try:
                    resolve_gguf(model)
                except Exception as e:  # the message is the point
                    why = str(e)
            if why:
                out[LLAMACPP] = why
    return out


def check_quant_available(quants: list[str]) -> None:
    """``--quant`` needs ``llmopt.quant.linear``; say so plainly when it does not import yet."""
    if not quants:
        return
    try:
        import llmopt.quant.linear as linear
    except ImportError as e:
        raise ValueError(f"--quant {','.join(quants)} needs llmopt.quant.linear, which does not import here "
                         f"({e}); run without --quant for the fp32 rows") from None
    known = getattr(linear, "FORMATS", None)
    known = None if known is None else [*known, "fp32", "gguf"]  # float / a GGUF file's own blocks
    unknown = [q for q in quants if known is not None and q not in known]
    if unknown:
        raise ValueError(f"unknown quant format {unknown[0]!r} for --quant; known: {', '.join(sorted(known))}")


Progress = Callable[[str], None]


def run_grid(config: GridConfig, progress: Progress | None = None, command: str | None = None) -> dict[str, Any]:
    """Run every cell for every system; return the JSON-ready result (see the module docstring).
    Each system runs in a spawned worker process, so a calling script needs a ``__main__`` guard."""
    check_quant_available(config.quants)
    say = progress or (lambda msg: log.info("%s", msg))
    machine = machine_info(config.threads)
    max_c = max(c.concurrency for c in config.cells)
    llmopt_kw = {"model": config.model, "threads": config.threads, "num_kv_blocks": kv_blocks_needed(config.cells),
                 "max_num_seqs": max(64, max_c)}
    specs: list[tuple[str, str, dict[str, Any]]] = [(LLMOPT, LLMOPT, dict(llmopt_kw))]
    specs += [(f"{LLMOPT}[{q}]", LLMOPT, {**llmopt_kw, "quant": q}) for q in config.quants]
    for name, _, kw in specs:
        kv = config.system_kv_dtype.get(name, config.kv_dtype)
        if kv is not None:  # its quality is scored through the cache: room for one held-out text
            kw["kv_dtype"] = kv
            kw["num_kv_blocks"] = max(kw["num_kv_blocks"], math.ceil(QUALITY_MAX_TOKENS / 16) + 1)
    skipped = peer_problems(config.peers, config.model)
    for name, why in skipped.items():
        say(f"skipping {name}: {why}")
        log.warning("bench: skipping %s: %s", name, why)
    if LLAMACPP in [PEERS[p] for p in config.peers] and LLAMACPP not in skipped:
        from llmopt.bench.llamacpp import resolve_gguf
        from llmopt.config import EngineConfig

        specs.append((LLAMACPP, LLAMACPP, {"model": str(resolve_gguf(config.model)), "threads": config.threads,
                                           "max_seq_len": max(c.input_len + c.output_len for c in config.cells),
                                           # llama.cpp gets our engine's token budget per step as n_batch
                                           "n_batch": EngineConfig().max_num_batched_tokens}))
    if config.baseline == "hf":
        specs.append((TRANSFORMERS, TRANSFORMERS, {"model": config.model, "threads": config.threads}))
    workers: dict[str, Worker] = {}
    cells_out: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    try:
        for name, kind, kw in specs:
            say(f"loading {name} ({config.model})")
            workers[name] = Worker(name, kind, kw, config.threads, config.system_env.get(name))
        vocab = min(w.info["vocab_size"] for w in workers.values())  # prompt ids every system can take
        quality = quality_of(workers, say) if config.quality else {}
        for i, cell in enumerate(config.cells, 1):
            tag = f"cell {i}/{len(config.cells)}: concurrency {cell.concurrency}, in {cell.input_len}, out {cell.output_len}"
            if config.warmup:
                prompts = random_prompts(cell.concurrency, cell.input_len, vocab, _prompt_seed(config.seed, cell, -1))
                for name, w in workers.items():
                    say(f"{tag}: warmup {name}")
                    w.run(prompts, min(WARMUP_TOKENS, cell.output_len))
            traces: dict[str, list[RunTrace]] = {name: [] for name in workers}
            for r in range(config.repeat):
                prompts = random_prompts(cell.concurrency, cell.input_len, vocab, _prompt_seed(config.seed, cell, r))
                order = list(workers) if r % 2 == 0 else list(reversed(workers))
                for name in order:
                    say(f"{tag}: {name} run {r + 1}/{config.repeat}")
                    traces[name].append(workers[name].run(prompts, cell.output_len))
            cells_out.append(_cell_result(cell, traces, config.reference))
            rows += _rows(cells_out[-1], quality)
    finally:
        for w in workers.values():
            w.close()
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {
        "kind": "llmopt-bench",
        "label": f"{Path(config.model).name} ({_threads(config.threads)})",
        "command": command or " ".join(sys.argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": config.model, "source": workers[LLMOPT].info["source"], "quant": None},
        "rows": rows,
        "cells": cells_out,
        "quality": quality,
        "settings": {
            "cells": [asdict(c) for c in config.cells], "threads": config.threads, "repeat": config.repeat,
            "warmup_tokens": WARMUP_TOKENS if config.warmup else 0, "seed": config.seed,
            "baseline": config.baseline, "quants": config.quants, "peers": config.peers, "skipped": skipped,
            "reference": config.reference,
            "systems": {name: {k: v for k, v in w.info.items() if k != "vocab_size"} for name, w in workers.items()},
        },
        "machine": machine,
        "duration_s": round(time.perf_counter() - t_start, 1),
        "method": __doc__.split("Method (the numbers mean exactly this):", 1)[1].split("The workers import", 1)[0].strip(),
    }


QUALITY_MAX_TOKENS = 512  # each held-out text's first tokens, as llmopt eval and llmopt quantize score them


def quality_of(workers: dict[str, Worker], say: Progress) -> dict[str, dict[str, Any]]:
    """Every system's bits per weight and held-out perplexity (``llmopt.quant.calib.heldout_texts``,
    encoded once by llmopt's tokenizer, the same ids for every system): what weights a row's speed was
    measured on. A system that cannot score (an error) gets its reason instead, the run goes on."""
    ids = workers[LLMOPT].heldout_ids(QUALITY_MAX_TOKENS)
    out: dict[str, dict[str, Any]] = {}
    for name, w in workers.items():
        say(f"held-out perplexity: {name} ({len(ids)} texts, {sum(len(x) - 1 for x in ids)} scored tokens)")
        try:
            out[name] = w.quality(ids)
        except RuntimeError as e:
            log.warning("bench: no held-out perplexity for %s: %s", name, e)
            out[name] = {"bits_per_weight": None, "heldout_ppl": None, "heldout_tokens": 0, "error": str(e)}
    return out


def _cell_result(cell: Cell, traces: dict[str, list[RunTrace]], reference: str) -> dict[str, Any]:
    systems = {name: summarize(ts, cell) for name, ts in traces.items()}
    ref_ids = [t.token_ids for t in traces[reference]]
    others = [n for n in systems if n != reference]
    tokens = {n: compare_tokens([t.token_ids for t in traces[n]], ref_ids) for n in others}
    for n in others:
        tokens[n]["comparable"] = n not in PEERS.values()  # a peer's arithmetic differs: agreement is no check
    return {
        "concurrency": cell.concurrency,
        "input_len": cell.input_len,
        "output_len": cell.output_len,
        "reference": reference,
        "systems": systems,
        "ratios": {n: ratios(systems[n], systems[reference]) for n in others},
        "greedy_tokens_vs_reference": tokens,
    }


def _rows(cell: dict[str, Any], quality: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows, one per system (what ``llmopt report`` plots)."""
    out = []
    for name, m in cell["systems"].items():
        q = quality.get(name, {})
        row = {"concurrency": cell["concurrency"], "input_len": cell["input_len"], "output_len": cell["output_len"],
               "backend": name, "bits_per_weight": q.get("bits_per_weight"), "heldout_ppl": q.get("heldout_ppl")}
        row.update({k: m[k] for k in ("output_tokens_per_s", "stream_decode_tokens_per_s", "prefill_tokens_per_s",
                                      "ttft_p50_ms",
                                      "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms", "cpu_ms_per_output_token",
                                      "peak_rss_mb")})
        r = cell["ratios"].get(name)
        row["throughput_x_vs_reference"] = r["output_tokens_per_s_x"] if r else 1.0
        out.append(row)
    return out


# ---- rendering ---------------------------------------------------------------------------------
def _threads(n: int) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def _f(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


TABLE_COLUMNS = ("conc.", "in / out", "system", "bits/w", "held-out ppl", "output tok/s", "decode tok/s/stream", "prefill tok/s",
                 "TTFT p50 / p90 (ms)",
                 "TPOT p50 / p90 (ms)", "CPU ms/token", "peak RSS (MB)", "tok/s vs ref", "same greedy tokens")


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    """The table every front end prints: one row per (cell, system), strings only."""
    out = []
    quality = result.get("quality", {})
    for cell in result["cells"]:
        for name, m in cell["systems"].items():
            r = cell["ratios"].get(name)
            match = cell["greedy_tokens_vs_reference"].get(name)
            q = quality.get(name, {})
            out.append([
                str(cell["concurrency"]), f"{cell['input_len']} / {cell['output_len']}", name,
                _f(q.get("bits_per_weight"), 2), _f(q.get("heldout_ppl"), 4),
                _f(m["output_tokens_per_s"]), _f(m["stream_decode_tokens_per_s"]), _f(m.get("prefill_tokens_per_s"), 0),
                f"{_f(m['ttft_p50_ms'], 0)} / {_f(m['ttft_p90_ms'], 0)}",
                f"{_f(m['tpot_p50_ms'])} / {_f(m['tpot_p90_ms'])}",
                _f(m["cpu_ms_per_output_token"]),
                _f(m["peak_rss_mb"], 0),
                f"{r['output_tokens_per_s_x']:.2f}x" if r and r["output_tokens_per_s_x"] is not None else "(ref)",
                "(ref)" if match is None else f"{match['identical']}/{match['requests']}"
                if match.get("comparable", True) else "n/a",
            ])
    return out


def quality_note(result: dict[str, Any]) -> str:
    """The table's note on its bits/w and held-out ppl columns ("" when the run scored nothing)."""
    scored = [q for q in result.get("quality", {}).values() if q.get("heldout_tokens")]
    if not scored:
        return ""
    return (f"bits/w = bits per weight of the linear layers as the system holds them (output head left out); "
            f"held-out ppl = perplexity over the {scored[0]['heldout_tokens']} scored tokens of llmopt's held-out "
            "texts (never calibration or training text), the same token ids for every system; ")


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join("---:" if i not in (2,) else "---"
                                                                     for i in range(len(TABLE_COLUMNS))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    m = result["machine"]
    lines.append("")
    lines.append(f"{result['model']['name']}, fp32, {_threads(m['threads'])}, {m['cpu_model']}, torch {m['torch']}, "
                 f"transformers {m['transformers']}, commit {(m['git'].get('commit') or '?')[:10]}"
                 f"{' (dirty)' if m['git'].get('dirty') else ''}; repeat {result['settings']['repeat']}, "
                 f"load average {m['load_average_start']} -> {m['load_average_end']}.")
    if quality_note(result):
        lines.append(quality_note(result).rstrip("; ") + ".")
    peer = result["settings"].get("systems", {}).get(LLAMACPP)
    if peer:
        lines.append(f"llama.cpp: llama-cpp-python {peer.get('llama_cpp_python')}, the same GGUF file with its own "
                     "quantized arithmetic (so its greedy tokens are not compared: n/a); concurrency > 1 decodes all "
                     "sequences in one llama_decode per step.")
    for name, why in result["settings"].get("skipped", {}).items():
        lines.append(f"{name} skipped: {why}")
    return "\n".join(lines)
