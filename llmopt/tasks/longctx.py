"""Long-context suites: passkey retrieval, needle in a haystack, and long-text perplexity.

Everything is generated offline from text that ships with Python, deterministic in
``(n, seed, lengths, depths)`` and the model's tokenizer:

- **filler** (``haystack_paragraphs``): the docstrings of a fixed list of standard-library
  modules and their public top-level members, read from the source files, paragraphs of at least
  80 characters.
  Each item takes its own seeded shuffle of these paragraphs, so no two items share a haystack.
- ``passkey``: the passkey task (Mohtashami & Jaggi, 2023). A 5-digit key is stated ("The secret
  number is 71432. Remember it. 71432 is the secret number.") at a depth of 0..100% of the
  filler; the question asks for it. Graded strictly: the *first* run of digits in the output
  must equal the key (a wrong number first, or none, is wrong). The assistant turn starts with
  "The secret number is" (the prompt ends with it), so a small chat model answers rather than
  chats. (The paper's "pass key" wording is not used: in Python documentation filler a 135M model
  reads it as Python's ``pass`` and explains the keyword instead: 1/4 vs 4/4 at 1k tokens.)
- ``needle``: a key-value needle (the RULER form): "One of the special magic numbers for
  {word} is: {7 digits}." at the depth; the question asks for the number of that word. Graded
  strictly the same way against the 7-digit value (assistant turn started with "The special magic
  number for {word} is").
- ``longppl``: perplexity of windows of ``long_ppl_tokens`` tokens cut from the concatenation of
  the language reference help topics (``pydoc_data.topics``) in a seeded order; every token after
  the first is scored (``LLM.score``, which reads the KV cache in the engine's ``kv_dtype``).

Lengths are prompt lengths in tokens *including* the chat template, built to within a few tokens
of ``length - ANSWER_TOKENS`` (so an 8,192-token model still has room for the answer); each item
records its exact length. ``n`` is the number of items per (length, depth) cell.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import random
import re
from dataclasses import dataclass
from typing import Any

from .base import Grade, Item

LONG_SUITES: tuple[str, ...] = ("passkey", "needle", "longppl")
DEFAULT_LENGTHS: tuple[int, ...] = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
ANSWER_TOKENS = 12  # greedy tokens generated per retrieval item; kept free in the window

# Modules whose docstrings make the haystack (imported on use; a missing one is skipped).
FILLER_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
    "enum", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html.parser", "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools",
    "json", "locale", "logging", "mailbox", "mimetypes", "numbers", "operator", "optparse", "os",
    "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shlex",
    "shutil", "smtplib", "socket", "socketserver", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "unittest",
    "urllib.parse", "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile",
)

PASSKEY_INTRO = ("There is a secret number hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will ask you for it.")
NEEDLE_INTRO = "Some special magic numbers are hidden inside the following text. Memorize them."
NEEDLE_WORDS: tuple[str, ...] = (
    "amber", "basalt", "cedar", "dolphin", "ember", "falcon", "glacier", "harbor", "indigo", "juniper",
    "kestrel", "lantern", "meadow", "nebula", "orchid", "pepper", "quartz", "raven", "saffron", "thistle",
    "umber", "velvet", "willow", "yarrow", "zephyr",
)

_FIRST_NUMBER = re.compile(r"\d+")
_SENTENCE_END = re.compile(r"[.!?:]\s+")


def haystack_paragraphs() -> list[str]:
    """Docstring paragraphs (>= 80 characters, whitespace collapsed) of ``FILLER_MODULES``, in a
    fixed order: module by module, its own docstring then its public top-level classes and
    functions sorted by name. Read from the modules' source files (``ast``), never from live
    module objects, so that what else the process imported (which can add or patch attributes)
    does not change the items. Depends on the Python version."""
    out: list[str] = []
    seen: set[str] = set()
    for name in FILLER_MODULES:
        _module_paragraphs(name, out, seen)
    return out


def _module_paragraphs(name: str, out: list[str], seen: set[str]) -> None:
    """Append the new docstring paragraphs of module ``name`` (skipped when its source is absent)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return
    origin = spec.origin if spec is not None else None
    if not origin or not origin.endswith(".py"):
        return
    try:
        with open(origin, encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return
    docs = [ast.get_docstring(tree)]
    members = sorted((node.name, node) for node in tree.body
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and not node.name.startswith("_"))
    docs += [ast.get_docstring(node) for _, node in members]
    for doc in docs:
        for para in (doc or "").split("\n\n"):
            text = " ".join(para.split())
            if len(text) >= 80 and text not in seen:
                seen.add(text)
                out.append(text)


def first_number(text: str) -> str | None:
    m = _FIRST_NUMBER.search(text)
    return m.group(0) if m else None


def grade_first_number(expected: str, output: str) -> Grade:
    """Strict retrieval grade: the first run of digits in ``output`` is exactly ``expected``."""
    got = first_number(output)
    if got is None:
        return Grade(False, 0.0, "no number in the output")
    if got != expected:
        return Grade(False, 0.0, f"first number {got}, expected {expected}")
    return Grade(True, 1.0, "exact")


@functools.lru_cache(maxsize=1)
def _paragraphs() -> tuple[str, ...]:
    return tuple(haystack_paragraphs())


@dataclass(frozen=True)
class Haystack:
    """Prompt builder for one tokenizer: fits filler around a needle to a token length."""

    tokenizer: Any
    paragraphs: tuple[str, ...]

    def _filler_ids(self, rng: random.Random, n_tokens: int) -> list[list[int]]:
        """Whole paragraphs (token ids, each ending with a blank line) in a shuffled order, the last
        one cut so the total is exactly ``n_tokens``."""
        order = list(range(len(self.paragraphs)))
        rng.shuffle(order)
        out: list[list[int]] = []
        total = 0
        for i in order:
            if total >= n_tokens:
                break
            ids = self.tokenizer.encode(self.paragraphs[i] + "\n\n", add_special_tokens=False)
            out.append(ids[: n_tokens - total])
            total += len(out[-1])
        if total < n_tokens:
            raise ValueError(f"the filler corpus has fewer than {n_tokens} tokens; use shorter lengths")
        return out

    def prompt(self, intro: str, needle: str, question: str, depth: float, length: int,
               rng: random.Random, answer_prefix: str = "") -> tuple[list[dict[str, str]], int]:
        """Chat messages whose templated prompt (plus ``answer_prefix``) is at most ``length`` tokens
        and within a few of it, with ``needle`` at ``depth`` of the filler (0 = before all of it,
        1 = after it), and that exact prompt length."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")

        def messages(filler: str) -> list[dict[str, str]]:
            return [{"role": "user", "content": f"{intro}\n\n{filler}\n\n{question}"}]

        extra = len(self.tokenizer.encode(answer_prefix, add_special_tokens=False)) if answer_prefix else 0
        overhead = len(self.tokenizer.apply_chat_template(messages(needle))) + extra
        budget = length - overhead
        state = rng.getstate()
        for _ in range(4):  # decoding and re-encoding the filler can merge tokens differently: re-fit
            if budget < 16:
                raise ValueError(f"length {length} leaves no room for filler (the template, needle and question "
                                 f"take {overhead} tokens); use a longer length")
            rng.setstate(state)
            paras = self._filler_ids(rng, budget)
            text = "".join(self.tokenizer.decode(p) for p in paras).strip()
            # the needle goes at the sentence boundary closest to depth * the filler's length
            bounds = [0, len(text)] + [m.end() for m in _SENTENCE_END.finditer(text)]
            cut = min(bounds, key=lambda b: (abs(b - depth * len(text)), b))
            before, after = text[:cut].strip(), text[cut:].strip()
            msgs = messages(" ".join(x for x in (before, needle, after) if x))
            actual = len(self.tokenizer.apply_chat_template(msgs)) + extra
            if actual <= length:
                return msgs, actual
            budget -= actual - length
        raise ValueError(f"could not fit a prompt into {length} tokens with this tokenizer")


class RetrievalSuite:
    """``passkey`` or ``needle`` over lengths x depths, ``n`` items per cell."""

    def __init__(self, name: str, tokenizer: Any, lengths: tuple[int, ...] = DEFAULT_LENGTHS,
                 depths: tuple[float, ...] = DEFAULT_DEPTHS):
        if name not in ("passkey", "needle"):
            raise ValueError(f"unknown retrieval suite {name!r}: passkey or needle")
        if not lengths or not depths:
            raise ValueError("give at least one length and one depth")
        bad = [d for d in depths if not 0.0 <= d <= 1.0]
        if bad:
            raise ValueError(f"depths are fractions in [0, 1], got {bad}")
        if any(length <= ANSWER_TOKENS + 64 for length in lengths):
            raise ValueError(f"lengths must exceed {ANSWER_TOKENS + 64} tokens, got {list(lengths)}")
        self.name, self.lengths, self.depths = name, tuple(lengths), tuple(depths)
        self.haystack = Haystack(tokenizer, _paragraphs())

    def items(self, n: int, seed: int, shots: int = 0) -> list[Item]:
        out = []
        for length in self.lengths:
            for depth in self.depths:
                for k in range(n):
                    rng = random.Random(f"{self.name}/{seed}/{length}/{depth}/{k}")
                    if self.name == "passkey":
                        key = str(rng.randint(10000, 99999))
                        intro, question = PASSKEY_INTRO, "What is the secret number? Answer with the number only."
                        needle = f"The secret number is {key}. Remember it. {key} is the secret number."
                        prefix = "The secret number is"
                    else:
                        word = rng.choice(NEEDLE_WORDS)
                        key = str(rng.randint(1000000, 9999999))
                        intro = NEEDLE_INTRO
                        needle = f"One of the special magic numbers for {word} is: {key}."
                        question = f"What is the special magic number for {word} mentioned in the provided text?"
                        prefix = f"The special magic number for {word} is"
                    msgs, actual = self.haystack.prompt(intro, needle, question, depth, length - ANSWER_TOKENS, rng,
                                                        prefix)
                    out.append(Item(suite=self.name, id=f"{self.name}/{length}/{depth:g}/{k}", task=self.name,
                                    messages=msgs, reference=key,
                                    payload={"length": length, "depth": depth, "prompt_tokens": actual,
                                             "answer_prefix": prefix}))
        return out

    def grade(self, item: Item, answer: str | None, output: str) -> Grade:
        return grade_first_number(item.reference, output)


def long_text(seed: int) -> str:
    """The language-reference help topics concatenated in a seeded order (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    random.Random(seed).shuffle(names)
    return "\n\n".join(topics[k].strip() for k in names)


class LongPerplexitySuite:
    """``n`` consecutive windows of ``tokens`` tokens of :func:`long_text` (``seed``)."""

    name = "longppl"

    def __init__(self, tokenizer: Any, tokens: int = 4096):
        if tokens < 2:
            raise ValueError(f"long_ppl_tokens must be >= 2, got {tokens}")
        self.tokenizer, self.tokens = tokenizer, tokens

    def items(self, n: int, seed: int, shots: int = 0) -> list[Item]:
        ids = self.tokenizer.encode(long_text(seed), add_special_tokens=False)
        if n * self.tokens > len(ids):
            raise ValueError(f"the long text has {len(ids)} tokens: {n} windows of {self.tokens} do not fit; "
                             f"lower --n or --long-ppl-tokens")
        return [Item(suite=self.name, id=f"longppl/{seed}/{i}", task="pydoc_topics_concat", messages=[],
                     reference="", payload={"ids": ids[i * self.tokens:(i + 1) * self.tokens]})
                for i in range(n)]


def cell_accuracy(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy per (length, depth) cell of retrieval records, ordered by length then depth."""
    cells: dict[tuple[int, float], list[bool]] = {}
    for r in records:
        cells.setdefault((r["length"], r["depth"]), []).append(bool(r["correct"]))
    return [{"length": L, "depth": d, "n": len(v), "accuracy": sum(v) / len(v)}
            for (L, d), v in sorted(cells.items())]
