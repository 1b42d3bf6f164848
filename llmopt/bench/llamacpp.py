"""llama.cpp as an optional peer in ``llmopt bench`` (``pip install 'llmopt[llamacpp]'``).

``LlamaCppSystem`` runs the same GGUF file llmopt loads (the registry's Q4_1 file runs natively in
llama.cpp, no conversion) through llama-cpp-python and follows the bench method exactly: the
cell's prompts as token ids, greedy (argmax of the logits), exactly ``output_len`` tokens with EOS
ignored, a timestamp per generated token, all requests arriving together at ``t0``.

- Every cell, concurrency 1 included, runs through llama.cpp's batch API the way ``llama-server``
  schedules (continuous batching): a context with ``n_seq_max = concurrency`` (one KV stream per
  sequence); each ``llama_decode`` holds the next token of every sequence that has started
  generating, then as many prompt tokens as still fit in ``n_batch`` (logits only at each
  sequence's last prompt token). So a sequence whose prompt is done decodes while the others are
  still being prefilled, exactly as llmopt's scheduler does, and its TPOT holds no wait for them.
- Its best settings: ``n_batch`` = llmopt's token budget per step (``EngineConfig``'s
  ``max_num_batched_tokens``, 2048), ``n_ubatch`` = llama.cpp's default (512), flash attention as
  llama.cpp decides by default (``LLAMA_FLASH_ATTN_TYPE_AUTO``; llama-cpp-python's ``Llama()``
  turns it off unless asked, so the contexts here are built from the C parameters directly).

llama.cpp multiplies Q4_1 weights with 8-bit-quantized activations, llmopt fp32 and transformers
dequantize the weights and compute in fp32, so greedy tokens legitimately differ: the grid records
them but does not count agreement with the reference as a correctness check.

The bench runs this system in its own process started as ``python llamacpp.py <fd> <json>``: this
file imports nothing from ``llmopt`` at module level, so that process never imports torch (which
would add ~250 MB of RSS that llama.cpp does not need) and its peak RSS is llama.cpp's own.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

NAME = "llama.cpp"
PEER = "llamacpp"  # the --peer value
INSTALL_HINT = "pip install 'llmopt[llamacpp]' (builds llama.cpp from source, a few minutes)"
CTX_ALIGN = 256  # llama.cpp pads context sizes to 256 cells


def missing_reason() -> str | None:
    """None if llama-cpp-python is importable here, else why not (without importing it)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama_cpp is not installed: {INSTALL_HINT}"
    return None


def resolve_gguf(model: str | Path) -> Path:
    """A registry name or a path -> an existing ``.gguf`` file (llama.cpp reads nothing else)."""
    p = Path(model).expanduser()
    if not p.is_file():
        from llmopt.models.registry import resolve  # only for registry names: imports llmopt

        p = resolve(model)
    if not p.is_file() or p.suffix.lower() != ".gguf":
        raise ValueError(f"llama.cpp runs GGUF files only; model {str(model)!r} resolves to {p}, which is not a "
                         ".gguf file")
    return p


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


class LlamaCppSystem:
    """llama.cpp through llama-cpp-python with the bench's ``run`` interface (see the module docstring)."""

    def __init__(self, model: str, threads: int, max_seq_len: int = 1024, n_batch: int = 2048,
                 n_ubatch: int = 512, flash_attn: str = "auto", verbose: bool = False):
        import llama_cpp
        import numpy as np

        self._lc, self._np = llama_cpp, np
        modes = {"auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                 "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}
        if flash_attn not in modes:
            raise ValueError(f"flash_attn must be one of {', '.join(modes)}, got {flash_attn!r}")
        if n_batch < 1 or n_ubatch < 1:
            raise ValueError(f"n_batch and n_ubatch must be >= 1, got {n_batch}, {n_ubatch}")
        n_ubatch = min(n_ubatch, n_batch)  # llama.cpp's own rule
        path = resolve_gguf(model)
        t0 = time.perf_counter()
        self.n_batch, self.n_ubatch, self.flash_attn = n_batch, n_ubatch, modes[flash_attn]
        self.max_seq_len = max_seq_len
        # The high-level object only holds the model (its own small context is never used for a run).
        self.llm = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=CTX_ALIGN,
                                   n_batch=CTX_ALIGN, n_ubatch=CTX_ALIGN, logits_all=False, verbose=verbose)
        self.vocab_size = self.llm.n_vocab()
        self._batched: tuple[int, int, Any, Any] | None = None  # (n_seq, n_ctx_seq, ctx, batch)
        self._batched_n_batch = n_batch  # what the context really takes per llama_decode
        self.info = {
            "llama_cpp_python": getattr(llama_cpp, "__version__", None),
            "gguf": str(path),
            "weights": "as stored in the GGUF (llama.cpp runs the quantized tensors natively)",
            "threads": threads, "n_batch": n_batch, "n_ubatch": n_ubatch, "flash_attn": flash_attn,
            "scheduling": "continuous batching through llama_decode: started sequences decode while later "
                          "prompts prefill (n_seq_max = concurrency, one KV stream per sequence)",
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
            "load_seconds": round(time.perf_counter() - t0, 3),
        }

    def quality(self, id_lists: list[list[int]]) -> dict[str, Any]:
        """Bits per weight of the file's decoder linear tensors (``blk.*`` matrices, as llama.cpp holds
        them) and perplexity over ``id_lists`` by llama.cpp's own arithmetic: a second model object with
        logits for every position, one text per context reset, freed after. (Its own loop, not
        ``calib.score_token_ids``: this process must not import the llmopt package, and with it torch.)"""
        import gguf

        np = self._np
        reader = gguf.GGUFReader(self.info["gguf"])
        mats = [t for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
        bits = sum(int(t.n_bytes) * 8 for t in mats) / max(1, sum(int(t.n_elements) for t in mats))
        n_ctx = _round_up(max(len(ids) for ids in id_lists), CTX_ALIGN)
        llm = self._lc.Llama(self.info["gguf"], n_threads=self.info["threads"], n_threads_batch=self.info["threads"],
                             n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, self.n_ubatch), logits_all=True,
                             verbose=False)
        try:
            nll, n = 0.0, 0
            for ids in id_lists:
                if len(ids) < 2:
                    raise ValueError(f"text encodes to {len(ids)} tokens: perplexity needs at least 2")
                llm.reset()
                llm.eval(list(ids))
                logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
                top = logits.max(axis=1)
                lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
                nll += float((lse - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
                n += len(ids) - 1
        finally:
            llm.close()
        return {"bits_per_weight": round(bits, 4), "heldout_ppl": round(float(np.exp(nll / n)), 4),
                "heldout_tokens": n}

    # ---- helpers -------------------------------------------------------------------------------
    def _argmax(self, ctx: Any, i: int) -> int:
        ptr = self._lc.llama_get_logits_ith(ctx, i)
        if not ptr:
            raise RuntimeError(f"llama.cpp returned no logits for batch index {i}")
        return int(self._np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)).argmax())

    def _check(self, prompts: list[list[int]], output_len: int) -> None:
        if not prompts or output_len < 1:
            raise ValueError("a run needs at least one prompt and output_len >= 1")
        for p in prompts:
            if not p:
                raise ValueError("llama.cpp needs non-empty prompts")
            if min(p) < 0 or max(p) >= self.vocab_size:
                raise ValueError(f"prompt token id out of range for a vocabulary of {self.vocab_size}")

    def close(self) -> None:
        self._free_batched()
        self.llm.close()

    def _free_batched(self) -> None:
        if self._batched is not None:
            _, _, ctx, batch = self._batched
            self._lc.llama_batch_free(batch)
            self._lc.llama_free(ctx)
            self._batched = None

    def _batched_context(self, n_seq: int, seq_len: int) -> tuple[Any, Any]:
        """A context for ``n_seq`` parallel sequences of up to ``seq_len`` tokens each (threads,
        ``n_batch``, ``n_ubatch`` and flash attention as constructed); reused while the shape fits,
        replaced otherwise (so an idle KV cache never inflates a later cell's RSS)."""
        lc = self._lc
        n_ctx_seq = _round_up(seq_len, CTX_ALIGN)
        if self._batched is not None and self._batched[:2] == (n_seq, n_ctx_seq):
            return self._batched[2], self._batched[3]
        self._free_batched()
        limit = lc.llama_max_parallel_sequences()
        if n_seq > limit:
            raise ValueError(f"llama.cpp supports at most {limit} parallel sequences, the cell asks for {n_seq}")
        params = lc.llama_context_params.from_buffer_copy(self.llm.context_params)
        params.n_seq_max = n_seq
        params.n_ctx = n_seq * n_ctx_seq  # split evenly: one KV stream of n_ctx_seq cells per sequence
        params.kv_unified = False
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_ubatch
        params.flash_attn_type = self.flash_attn
        ctx = lc.llama_init_from_model(self.llm.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {n_seq} sequences of {n_ctx_seq} tokens")
        self._batched_n_batch = lc.llama_n_batch(ctx)  # capped at n_ctx by llama.cpp
        batch = lc.llama_batch_init(max(self.n_batch, n_seq), 0, 1)
        self._batched = (n_seq, n_ctx_seq, ctx, batch)
        return ctx, batch

    def _decode(self, ctx: Any, batch: Any, items: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of ``items`` = (token, position, seq_id, wants_logits)."""
        for i, (tok, pos, seq, logits) in enumerate(items):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1 if logits else 0
        batch.n_tokens = len(items)
        rc = self._lc.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} on a batch of {len(items)} tokens "
                               "(1: no KV slot, -1: invalid batch, < -1: fatal)")

    # ---- the bench interface -------------------------------------------------------------------
    def run(self, prompts: list[list[int]], output_len: int) -> tuple[float, float, list[list[int]],
                                                                       list[list[float]], dict[str, Any]]:
        """All prompts arrive at ``t0``; returns (t0, t_end, token ids, token times, extras) per request.
        Each ``llama_decode`` carries the next token of every started sequence first, then prompt
        tokens up to ``n_batch`` (see the module docstring)."""
        self._check(prompts, output_len)
        lc = self._lc
        n = len(prompts)
        ctx, batch = self._batched_context(n, max(len(p) for p in prompts) + output_len)
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        ids: list[list[int]] = [[] for _ in prompts]
        times: list[list[float]] = [[] for _ in prompts]
        pending = [(tok, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, tok in enumerate(p)]
        step = min(self.n_batch, self._batched_n_batch)
        calls, next_prompt = 0, 0
        t0 = time.perf_counter()
        while next_prompt < len(pending) or any(len(x) < output_len for x in ids):
            items = [(ids[s][-1], len(prompts[s]) + len(ids[s]) - 1, s, True)
                     for s in range(n) if ids[s] and len(ids[s]) < output_len]
            take = max(0, step - len(items))
            items += pending[next_prompt:next_prompt + take]
            next_prompt += take
            self._decode(ctx, batch, items)
            calls += 1
            new = [(s, self._argmax(ctx, i)) for i, (_, _, s, want) in enumerate(items) if want]
            now = time.perf_counter()
            for s, tok in new:
                ids[s].append(tok)
                times[s].append(now)
        t_end = time.perf_counter()
        return t0, t_end, ids, times, {"llama_decode_calls": calls}


def _main(argv: list[str]) -> None:
    """Standalone bench worker: ``python llamacpp.py FD JSON_KWARGS``. Talks the grid's worker
    protocol over the inherited socket FD, loading ``grid.py`` by file path so that nothing imports
    the ``llmopt`` package (and with it torch)."""
    import importlib.util
    import json
    import sys
    from multiprocessing.connection import Connection

    here = Path(__file__).resolve().parent
    if sys.path and Path(sys.path[0] or ".").resolve() == here:
        sys.path.pop(0)  # this folder is not a package root: grid.py, cli.py must not shadow anything
    spec = importlib.util.spec_from_file_location("_llmopt_bench_grid_standalone", here / "grid.py")
    grid = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = grid  # dataclasses resolve their module by name
    spec.loader.exec_module(grid)
    conn = Connection(int(argv[0]))
    kwargs = json.loads(argv[1])
    grid.serve(conn, lambda: LlamaCppSystem(**kwargs))


if __name__ == "__main__":
    import sys as _sys

    _main(_sys.argv[1:])
