"""Which grammar library should enforce guided decoding? (prints numbers, never asserts)

    .venv/bin/python benchmarks/bench_guided.py [--model smollm2-135m-instruct] [--reps 3]
    .venv/bin/python benchmarks/bench_guided.py --engine [--streams 16] [--max-tokens 64]

For every installed candidate (llguidance, xgrammar, outlines-core) on the model's own tokenizer
(SmolLM2: byte-level BPE, vocab 49152), side by side in one run:

- ``tokenizer``: building the library's tokenizer/vocabulary index (once per tokenizer);
- ``setup``: compiling one grammar and creating a matcher for one request (regex, JSON schema);
- ``mask 1``: one vocabulary bitmask for one stream, averaged over a real token walk;
- ``mask 16``: the bitmasks of 16 streams for one step (each stream its own matcher), with the
  library's batch call where it has one, and the per-stream cost;
- ``allowed``: mean allowed tokens per step, a cross-check that the libraries agree on the
  language (they differ where a library restricts JSON whitespace or token boundaries).

Grammars: the competition rule ``^<think>(.*?)</think>\\s*<answer>(.*?)</answer>$`` (DOTALL; the
same language as ``<think>[\\s\\S]*</think>\\s*<answer>[\\s\\S]*</answer>``, anchors implicit) and a
small JSON schema. The walk is the tokenization of a valid string (~150 tokens). A library that
is not installed is reported as such; install them with
``pip install llguidance xgrammar outlines-core`` (xgrammar wants torch and triton: use
``--no-deps`` plus ``apache-tvm-ffi`` if pip would touch torch).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

REGEX = r"<think>[\s\S]*</think>\s*<answer>[\s\S]*</answer>"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city"]},
    },
    "required": ["name", "age", "tags"],
}
THINK = ("The train travels 60 miles per hour for 2.5 hours, so the distance is 60 * 2.5 = 150 miles. "
         "Then it returns at 50 miles per hour: 150 / 50 = 3 hours. The whole trip takes 2.5 + 3 = 5.5 hours, "
         "and the average speed is the total distance over the total time: 300 / 5.5 = 54.5 miles per hour. ")
REGEX_TEXT = f"<think>{THINK * 2}</think>\n<answer>54.5</answer>"
JSON_TEXT = json.dumps({"name": "Ada Lovelace", "age": 36, "email": "ada@example.org",
                        "tags": ["math", "poetry", "engines", "notes", "analysis", "computing"],
                        "address": {"city": "London", "zip": "W1"}})


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def popcount(mask: np.ndarray) -> int:
    return int(np.unpackbits(mask.view(np.uint8)).sum())


# ---- one adapter per library: tokenizer(), compile(kind, spec), matcher(compiled), fill(ms, bm), accept --
class LLGuidance:
    name = "llguidance"

    def __init__(self, hf: Any, vocab: int, eos: list[int]):
        import llguidance as llg

        self.llg, self.vocab, self.eos, self.hf = llg, vocab, eos, hf
        self.executor = llg.LLExecutor()

    def tokenizer(self) -> None:
        self.tok = self.llg.LLTokenizer(self.hf.backend_tokenizer.to_str(), n_vocab=self.vocab, eos_token=self.eos)

    def compile(self, kind: str, spec: Any) -> Any:
        M = self.llg.LLMatcher
        grammar = M.grammar_from_regex(spec) if kind == "regex" else M.grammar_from_json_schema(spec)
        err = M.validate_grammar(grammar, self.tok)
        if err:
            raise ValueError(err)
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self.llg.LLMatcher(self.tok, compiled)

    def fill(self, matchers: list[Any], bm: np.ndarray) -> None:
        if len(matchers) == 1:
            matchers[0].unsafe_compute_mask_ptr(bm.ctypes.data, bm.shape[1] * 4)
        else:
            self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bm.ctypes.data,
                                                  bm.shape[1] * 4, bm.shape[0])

    def accept(self, m: Any, token: int) -> bool:
        return bool(m.consume_token(token))


class XGrammar:
    name = "xgrammar"

    def __init__(self, hf: Any, vocab: int, eos: list[int]):
        import torch
        import xgrammar as xgr

        self.xgr, self.torch, self.vocab, self.eos, self.hf = xgr, torch, vocab, eos, hf

    def tokenizer(self) -> None:
        info = self.xgr.TokenizerInfo.from_huggingface(self.hf, vocab_size=self.vocab, stop_token_ids=self.eos)
        self.compiler = self.xgr.GrammarCompiler(info, cache_enabled=False)
        self.batch = self.xgr.BatchGrammarMatcher()

    def compile(self, kind: str, spec: Any) -> Any:
        if kind == "regex":
            return self.compiler.compile_regex(spec)
        return self.compiler.compile_json_schema(json.dumps(spec))

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers: list[Any], bm: np.ndarray) -> None:
        t = self.torch.from_numpy(bm)
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(t, 0)
        else:
            self.batch.batch_fill_next_token_bitmask(matchers, t)

    def accept(self, m: Any, token: int) -> bool:
        return bool(m.accept_token(token))


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, hf: Any, vocab: int, eos: list[int]):
        import outlines_core

        self.oc, self.vocab, self.eos, self.hf = outlines_core, vocab, eos, hf

    def tokenizer(self) -> None:
        # outlines-core takes each token's bytes: undo the GPT-2 byte-to-unicode map; special tokens out
        table = _byte_decoder()
        special = set(self.hf.all_special_ids)
        by_bytes: dict[bytes, list[int]] = {}
        for text, tid in self.hf.get_vocab().items():
            if tid in special or tid >= self.vocab:
                continue
            try:
                by_bytes.setdefault(bytes(table[c] for c in text), []).append(tid)
            except KeyError:  # an added token outside the byte alphabet: leave it out
                continue
        self.vocabulary = self.oc.Vocabulary(self.eos[0], by_bytes)

    def compile(self, kind: str, spec: Any) -> Any:
        regex = spec if kind == "regex" else self.oc.json_schema.build_regex_from_schema(json.dumps(spec))
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, matchers: list[Any], bm: np.ndarray) -> None:
        for i, g in enumerate(matchers):
            g.write_mask_into(bm[i].ctypes.data, bm.shape[1], 4)

    def accept(self, m: Any, token: int) -> bool:
        m.advance(token)
        return True


def _byte_decoder() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


ADAPTERS = (LLGuidance, XGrammar, OutlinesCore)


def walk(lib: Any, compiled: Any, tokens: list[int], streams: int, words: int) -> tuple[float, float]:
    """Seconds per step to fill ``streams`` masks (walking ``tokens``) and the mean allowed count."""
    matchers = [lib.matcher(compiled) for _ in range(streams)]
    bm = np.zeros((streams, words), dtype=np.int32)
    fill_s, allowed = 0.0, []
    for tok in tokens:
        t = time.perf_counter()
        lib.fill(matchers, bm)
        fill_s += time.perf_counter() - t
        allowed.append(popcount(bm[0]))
        if not (bm[0, tok >> 5] >> (tok & 31)) & 1:
            raise RuntimeError(f"{lib.name}: token {tok} of the valid walk is masked out")
        for m in matchers:
            if not lib.accept(m, tok):
                raise RuntimeError(f"{lib.name}: token {tok} rejected")
    return fill_s / len(tokens), statistics.mean(allowed)


ENGINE_QUESTIONS = ["What is 17 * 23?", "What is 144 divided by 12?", "Tom has 5 apples and buys 7 more. How many?",
                    "What is 2 to the power of 10?", "A pen costs 3 dollars. How much do 12 pens cost?",
                    "What is 15% of 80?", "What is the square root of 169?", "How many minutes are in 3 hours?",
                    "What is 1000 - 357?", "A train goes 60 km/h for 2 hours. How far does it go?",
                    "What is 9 * 8 + 4?", "What is half of 246?", "How many sides do 4 triangles have?",
                    "What is 81 / 9?", "What is 25 * 4?", "What is 7 cubed?"]


def engine_overhead(model: str, streams: int, max_tokens: int) -> None:
    """The engine with llguidance, ``streams`` chat requests at once: the time spent on grammar work
    (filling the masks, applying them to the logits, advancing the matchers) as a fraction of the
    generation's wall time, and tokens/s next to the same requests unguided, in one run."""
    import torch

    from llmopt import LLM, SamplingParams
    from llmopt.tasks.evaluate import guided_format_grammar

    llm = LLM(model, max_num_seqs=streams)
    chats = [[{"role": "user", "content": q}] for q in (ENGINE_QUESTIONS * (streams // 16 + 1))[:streams]]
    t0 = time.perf_counter()
    dec = llm.engine.guided_decoder()
    print(f"engine: {model}, {streams} streams, max_tokens {max_tokens}, torch threads {torch.get_num_threads()}; "
          f"tokenizer index {time.perf_counter() - t0:.2f}s (once per engine)")
    runs = [("unguided", {}), ("regex (the rule)", {"guided_regex": REGEX}),
            ("json schema", {"guided_json": SCHEMA}),
            ("eval --guided grammar", {"guided_grammar": guided_format_grammar(max(max_tokens, 96))}),
            ("unguided again", {})]
    print(f"{'decoding':<24} {'tokens':>7} {'wall':>8} {'tok/s':>7} {'grammar':>9} {'of wall':>8} {'finished by grammar':>20}")
    for name, kw in runs:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=not kw, **kw)
        g0 = dec.seconds
        t = time.perf_counter()
        outs = llm.chat(chats, params)
        wall = time.perf_counter() - t
        g = dec.seconds - g0
        ntok = sum(len(o.token_ids) for o in outs)
        stopped = sum(o.finish_reason == "stop" for o in outs)
        print(f"{name:<24} {ntok:>7} {wall:>7.1f}s {ntok / wall:>7.1f} {g * 1e3:>7.0f}ms {g / wall:>7.1%} "
              f"{stopped if kw else '-':>20}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; the median is printed")
    ap.add_argument("--engine", action="store_true",
                    help="instead of the library table: grammar time as a fraction of decode time in the engine")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.engine:
        engine_overhead(args.model, args.streams, args.max_tokens)
        return
    from llmopt.models.loader import open_checkpoint

    cfg, tok, _, path = open_checkpoint(args.model)
    hf, vocab = tok.hf, cfg.vocab_size
    words = (vocab + 31) // 32
    eos = tok.stop_token_ids
    walks = {"regex": (REGEX, tok.encode(REGEX_TEXT, add_special_tokens=False)),
             "json": (SCHEMA, tok.encode(JSON_TEXT, add_special_tokens=False))}
    print(f"model {path.name}: vocab {vocab}, walks: regex {len(walks['regex'][1])} tokens, "
          f"json {len(walks['json'][1])} tokens; median of {args.reps}")
    header = f"{'library':<14} {'version':<9} {'tokenizer':>10} {'grammar':<6} {'setup':>9} " \
             f"{'mask 1':>9} {'mask 16/step':>13} {'per stream':>11} {'allowed':>8}"
    print(header)
    print("-" * len(header))
    from importlib.metadata import PackageNotFoundError, version

    for cls in ADAPTERS:
        try:
            lib = cls(hf, vocab, eos)
            ver = version(cls.name)
        except (ImportError, PackageNotFoundError) as e:
            print(f"{cls.name:<14} not installed ({e})")
            continue
        tok_s = statistics.median(timed(lib.tokenizer)[0] for _ in range(args.reps))
        for kind, (spec, tokens) in walks.items():
            try:
                setups = []
                for _ in range(args.reps):
                    s, compiled = timed(functools.partial(lib.compile, kind, spec))
                    s2, _ = timed(functools.partial(lib.matcher, compiled))
                    setups.append(s + s2)
                one = [walk(lib, compiled, tokens, 1, words) for _ in range(args.reps)]
                many = [walk(lib, compiled, tokens, 16, words) for _ in range(args.reps)]
            except Exception as e:
                print(f"{cls.name:<14} {ver:<9} {tok_s * 1e3:>8.0f}ms {kind:<6} failed: {str(e)[:80]}")
                continue
            m1 = statistics.median(x[0] for x in one)
            m16 = statistics.median(x[0] for x in many)
            print(f"{cls.name:<14} {ver:<9} {tok_s * 1e3:>8.0f}ms {kind:<6} {statistics.median(setups) * 1e3:>7.1f}ms "
                  f"{m1 * 1e6:>7.0f}us {m16 * 1e6:>11.0f}us {m16 / 16 * 1e6:>9.0f}us {one[0][1]:>8.0f}")
    import torch

    from llmopt.engine.guided import apply_bitmask

    logits = torch.randn(16, vocab)
    bm = torch.from_numpy(np.random.default_rng(0).integers(-2**31, 2**31 - 1, (16, words), dtype=np.int32))
    reps = 200
    t = time.perf_counter()
    for _ in range(reps):
        apply_bitmask(logits.clone(), bm)
    t_apply = (time.perf_counter() - t) / reps
    t = time.perf_counter()
    for _ in range(reps):
        logits.clone()
    t_clone = (time.perf_counter() - t) / reps
    print(f"apply [16, {vocab}] bitmask to logits (llmopt.engine.guided.apply_bitmask, library-independent): "
          f"{(t_apply - t_clone) * 1e6:.0f}us")


if __name__ == "__main__":
    main()
