"""Guided decoding (structured outputs): token masks from a grammar, enforced before sampling.

vLLM's names: ``SamplingParams(guided_regex=...)``, ``guided_json=`` (a JSON schema, dict or
string), ``guided_choice=[...]`` and ``guided_grammar=`` (a Lark grammar in llguidance's dialect,
which can cap a rule's length in tokens: ``think[max_tokens=200]: /[^<]*/``).

The grammar library is llguidance (the ``guided`` extra), chosen with ``benchmarks/bench_guided.py``
against xgrammar and outlines-core on SmolLM2's tokenizer: the cheapest per-request setup (~1 ms;
xgrammar ~4 ms, outlines-core ~100 ms), a small wheel with no dependencies (xgrammar's pulls in
torch and triton), and masks (~12-18 us per stream; xgrammar 2-5 us) that cost well under 1% of
a decode step. See docs/guided.md for the table.

How the pieces fit:

- ``GuidedSpec``: (kind, canonical text) of one request's grammar; the cache key.
- ``check_spec``: validates a spec without a tokenizer (``SamplingParams`` calls it, so a bad
  regex or schema is a ``ValueError`` when the request is made, naming the problem).
- ``GuidedDecoder``: one per engine (so one per tokenizer). Builds the library's tokenizer once,
  keeps one compiled matcher per (kind, spec) and hands each sequence a copy (``start``); fills
  the vocabulary bitmasks of all guided rows of a step in one call (``fill_bitmask``).
- ``GuidedState``: a sequence's matcher, advanced by the engine on every token it appends. The
  state only depends on the output tokens, so preemption (KV recomputed, tokens kept) and prefix
  caching (KV shared, tokens the same) leave it correct as it is.
- ``apply_bitmask``: sets the logits of disallowed tokens to -inf in place ([S, V] rows).

EOS is in the mask only where the grammar accepts; when the grammar allows nothing but EOS the
engine finishes the sequence with finish_reason "stop" without spending another step.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

KINDS = ("regex", "json", "choice", "grammar")
EXTRA_HINT = "guided decoding needs the 'guided' extra: pip install 'llmopt[guided]' (installs llguidance)"


# JSON is written as ``json.dumps`` writes it ('{"a": 1, "b": [2, 3]}'): with free whitespace a small
# model can emit newlines and spaces until max_tokens (vLLM's disable_any_whitespace). A schema's
# "x-guidance" key overrides this: {"x-guidance": {"whitespace_flexible": true, "item_separator": ",",
# "key_separator": ":"}, ...}.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GuidedDecodingUnavailable(ImportError):
    """The grammar library (llguidance, the ``guided`` extra) is not installed."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as e:
        raise GuidedDecodingUnavailable(f"{EXTRA_HINT} ({e})") from e
    return llguidance


@dataclass(frozen=True)
class GuidedSpec:
    """One request's grammar: ``kind`` in KINDS and a canonical text (regex, schema JSON with sorted
    keys, or the JSON list of choices), so equal grammars share one compiled entry."""

    kind: str
    text: str

    @classmethod
    def of(cls, regex: str | None = None, json_schema: dict[str, Any] | str | None = None,
           choice: list[str] | None = None, grammar: str | None = None) -> GuidedSpec | None:
        given = [name for name, v in (("guided_regex", regex), ("guided_json", json_schema),
                                      ("guided_choice", choice), ("guided_grammar", grammar)) if v is not None]
        if len(given) > 1:
            raise ValueError("only one of guided_regex, guided_json, guided_choice, guided_grammar may be set, "
                             f"got {', '.join(given)}")
        if regex is not None:
            if not isinstance(regex, str) or not regex:
                raise ValueError(f"guided_regex must be a non-empty string, got {regex!r}")
            return cls("regex", regex)
        if json_schema is not None:
            if isinstance(json_schema, str):
                try:
                    json_schema = json.loads(json_schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"guided_json is not valid JSON ({e}); pass a JSON schema as a dict or a JSON string") from e
            if not isinstance(json_schema, (dict, bool)):
                raise ValueError(f"guided_json must be a JSON schema (an object), got {type(json_schema).__name__}")
            try:
                text = json.dumps(json_schema, sort_keys=True)
            except (TypeError, ValueError) as e:
                raise ValueError(f"guided_json cannot be serialized as JSON: {e}") from e
            return cls("json", text)
        if choice is not None:
            if (isinstance(choice, str) or not isinstance(choice, (list, tuple)) or not choice
                    or not all(isinstance(c, str) and c for c in choice)):
                raise ValueError(f"guided_choice must be a non-empty list of non-empty strings, got {choice!r}")
            return cls("choice", json.dumps(list(choice)))
        if grammar is not None:
            if not isinstance(grammar, str) or not grammar.strip():
                raise ValueError(f"guided_grammar must be a non-empty Lark grammar string, got {grammar!r}")
            return cls("grammar", grammar)
        return None

    def grammar(self) -> str:
        """The llguidance grammar for this spec (not yet validated)."""
        M = _llguidance().LLMatcher
        if self.kind == "regex":
            return M.grammar_from_regex(self.text)
        if self.kind == "json":
            return M.grammar_from_json_schema(self.text, defaults=JSON_DEFAULTS)
        if self.kind == "choice":
            return M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(self.text)))
        if self.kind == "grammar":
            return M.grammar_from_lark(self.text)
        raise ValueError(f"unknown guided kind {self.kind!r}: choose from {', '.join(KINDS)}")

    def describe(self) -> str:
        name = f"guided_{self.kind}"
        text = self.text if len(self.text) <= 80 else self.text[:77] + "..."
        return f"{name} {text!r}"


def _grammar_error(spec: GuidedSpec, message: str) -> ValueError:
    return ValueError(f"{spec.describe()} is not a grammar the guided decoder accepts: {message.strip()}")


@functools.lru_cache(maxsize=256)
def check_spec(spec: GuidedSpec) -> str:
    """Validate ``spec`` without a tokenizer. Returns the grammar; raises ValueError naming the problem."""
    llg = _llguidance()
    try:
        grammar = spec.grammar()
    except ValueError as e:
        raise _grammar_error(spec, str(e)) from e
    error = llg.LLMatcher.validate_grammar(grammar)
    if error:
        raise _grammar_error(spec, error)
    return grammar


class GuidedState:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: Any, spec: GuidedSpec, decoder: GuidedDecoder | None = None):
        self.matcher = matcher
        self.spec = spec
        self.decoder = decoder

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False if the grammar does not allow it (then the state is dead)."""
        t0 = time.perf_counter()
        ok = bool(self.matcher.consume_token(token))
        if self.decoder is not None:
            self.decoder.seconds += time.perf_counter() - t0
        return ok

    @property
    def done(self) -> bool:
        """Nothing but EOS may follow: the output is complete."""
        return bool(self.matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        return bool(self.matcher.is_accepting())

    @property
    def error(self) -> str:
        return str(self.matcher.get_error())


class GuidedDecoder:
    """The grammar side of one engine: the tokenizer index, compiled grammars and batched masks."""

    def __init__(self, tokenizer: Any, vocab_size: int, cache_size: int = 128):
        """``tokenizer``: llmopt's Tokenizer (a Hugging Face fast tokenizer inside); ``vocab_size``:
        the model's logits width (rows past the tokenizer's vocabulary are never allowed)."""
        self.llg = _llguidance()
        hf = tokenizer.hf
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("guided decoding needs a fast (Rust `tokenizers`) tokenizer; this model's is "
                             f"{type(hf).__name__}")
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self.eos_token_ids = list(tokenizer.stop_token_ids)
        backend = copy.copy(backend)  # serialize without padding or truncation settings
        backend.no_padding()
        backend.no_truncation()
        self.tok = self.llg.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=self.eos_token_ids)
        self.cache_size = cache_size
        self._compiled: OrderedDict[GuidedSpec, Any] = OrderedDict()
        self._bitmask = np.zeros((0, self.words), dtype=np.int32)
        self.seconds = 0.0  # spent on grammar work (masks, applying them, advancing states)

    def compiled(self, spec: GuidedSpec) -> Any:
        """The template matcher of ``spec`` (compiled on first use, then served from an LRU cache)."""
        m = self._compiled.get(spec)
        if m is not None:
            self._compiled.move_to_end(spec)
            return m
        grammar = check_spec(spec)
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise _grammar_error(spec, m.get_error())
        self._compiled[spec] = m
        if len(self._compiled) > self.cache_size:
            self._compiled.popitem(last=False)
        return m

    def start(self, spec: GuidedSpec) -> GuidedState:
        """A fresh matcher for one sequence."""
        return GuidedState(self.compiled(spec).deep_copy(), spec, self)

    def fill_bitmask(self, states: list[GuidedState]) -> torch.Tensor:
        """int32 [len(states), ceil(V/32)]: bit t of row i set where state i allows token t. A state
        whose grammar allows nothing (it hit a library error) gets the EOS tokens, so it ends."""
        n = len(states)
        if self._bitmask.shape[0] < n:
            self._bitmask = np.zeros((max(n, 2 * self._bitmask.shape[0]), self.words), dtype=np.int32)
        bm = self._bitmask[:n]
        # one call per row on this thread: on 2 cores llguidance's LLExecutor pool was no faster
        # (0.18-0.21 s vs 0.07 s of grammar time for 12 streams x 32 tokens, one run each way)
        for i, s in enumerate(states):
            s.matcher.unsafe_compute_mask_ptr(bm[i].ctypes.data, self.words * 4)
        empty = ~bm.any(axis=1)
        for row in np.flatnonzero(empty).tolist():
            log.warning("guided decoding: %s allows no token (%s); ending the sequence",
                        states[row].spec.describe(), states[row].error or "no error reported")
            for t in self.eos_token_ids:
                bm[row, t >> 5] |= np.int32(np.uint32(1 << (t & 31)).view(np.int32))
        return torch.from_numpy(bm.copy())


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [S, W] (bit t of word t//32) -> bool [S, vocab_size], True = allowed."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
    return torch.from_numpy(bits[:, :vocab_size]).bool()


# byte value -> the 8 additive biases of its bits (0 where the bit is set, -inf where it is not)
_BYTE_BIAS = np.where(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little") == 1,
                      np.float32(0.0), np.float32(-np.inf)).astype(np.float32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set the logits of disallowed tokens to -inf, in place; logits [S, V], bitmask int32 [S, W].

    Adds a 0/-inf bias looked up per mask byte (8 tokens at a time): a vectorized add, several
    times faster on CPU than ``masked_fill_`` with an unpacked boolean mask. The add runs in
    numpy (one thread): on a busy machine torch's two-thread split of so small an op waits on the
    slower thread and took 10x longer."""
    s, v = logits.shape
    bias = np.take(_BYTE_BIAS, bitmask.numpy().view(np.uint8), axis=0).reshape(s, -1)[:, :v]
    if logits.dtype == torch.float32 and logits.is_contiguous():
        out = logits.numpy()
        np.add(out, bias, out=out)
        return logits
    return logits.add_(torch.from_numpy(np.ascontiguousarray(bias)).to(logits.dtype))
