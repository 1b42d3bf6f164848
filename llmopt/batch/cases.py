"""The input of ``llmopt run``: schema, loading and validation.

A batch file holds either **test cases** (each a few questions with its own concurrency and
output-length limit; answered one JSON object per case with its ``duration``) or a **flat list of
questions** (answered as one JSON object). Both shapes are the competition's; see docs/batch.md.

Question::

    {"id": "q1", "content": "What is 17 * 23?", "system": "..."}

    id       string (non-empty) or integer, echoed unchanged in the output; unique within its case
             (flat list: within the file)
    content  non-empty string, sent as the user message
    system   optional string: the system message for this question ("" = none)

Test case::

    {"id": "case-1", "concurrency": 2, "max_tokens": 128, "system": "...", "questions": [<question>, ...]}

    id           string (non-empty) or integer, unique within the file; OUT records it for resume
    questions    non-empty list of questions
    concurrency  optional integer >= 1: at most this many of the case's questions in the engine at once
    max_tokens   optional integer >= 1: the most new tokens per answer
    think_budget optional integer >= 1: close <think> after this many tokens (docs/reasoning.md)
    system       optional string: the system message for the case's questions

Files:

- ``*.jsonl``: one JSON object per line, all test cases or all questions (blank lines are skipped,
  line numbers count them). Errors name the line: ``cases.jsonl line 3, questions[1].id: ...``.
- ``*.json`` (any other name too): one JSON document, either a list of test cases or of questions,
  or an object ``{"cases": [...]}`` / ``{"questions": [...]}`` that may also set file-wide
  ``system``, ``concurrency``, ``max_tokens`` and ``think_budget`` defaults. Errors name the path:
  ``questions.json, questions[2].content: ...``.

Unknown fields are errors (a misspelt ``concurency`` must not silently fall back to a default).
A value that is not set falls back: question ``system`` -> case -> file -> ``--system`` (whose
default asks for the ``<think>...</think> <answer>...</answer>`` format); case ``concurrency`` /
``max_tokens`` -> file -> ``--concurrency`` / ``--max-tokens``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Id = str | int

QUESTION_FIELDS = ("id", "content", "system")
CASE_FIELDS = ("id", "questions", "concurrency", "max_tokens", "system", "think_budget")
FILE_FIELDS = ("cases", "questions", "system", "concurrency", "max_tokens", "think_budget")


class BatchFormatError(ValueError):
    """A batch file that does not follow the schema; the message names the file, line or path, and field."""


@dataclass(frozen=True)
class Question:
    id: Id
    content: str
    system: str | None = None


@dataclass(frozen=True)
class Case:
    id: Id
    questions: tuple[Question, ...]
    concurrency: int | None = None
    max_tokens: int | None = None
    system: str | None = None
    think_budget: int | None = None


@dataclass(frozen=True)
class Batch:
    """A validated batch file. ``kind`` says which of ``cases`` / ``questions`` is filled."""

    path: Path
    kind: Literal["cases", "questions"]
    cases: tuple[Case, ...] = ()
    questions: tuple[Question, ...] = ()
    system: str | None = None  # file-wide defaults (JSON object form only)
    concurrency: int | None = None
    max_tokens: int | None = None
    think_budget: int | None = None

    @property
    def num_questions(self) -> int:
        return sum(len(c.questions) for c in self.cases) if self.kind == "cases" else len(self.questions)


def _fail(where: str, field: str | None, msg: str) -> BatchFormatError:
    return BatchFormatError(f"{where}, {field}: {msg}" if field else f"{where}: {msg}")


def _show(value: Any) -> str:
    s = json.dumps(value, ensure_ascii=False)
    return s if len(s) <= 40 else s[:37] + "..."


def _check_keys(obj: dict, allowed: tuple[str, ...], what: str, where: str, prefix: str) -> None:
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        raise _fail(where, prefix + unknown[0] if prefix else unknown[0],
                    f"unknown field in a {what} (allowed: {', '.join(allowed)})")


def _id(obj: dict, where: str, field: str) -> Id:
    if "id" not in obj:
        raise _fail(where, field, "missing (a string or an integer)")
    v = obj["id"]
    if isinstance(v, bool) or not isinstance(v, (str, int)) or v == "":
        raise _fail(where, field, f"must be a non-empty string or an integer, got {_show(v)}")
    return v


def _positive_int(obj: dict, key: str, where: str, field: str) -> int | None:
    v = obj.get(key)
    if v is None and key not in obj:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise _fail(where, field, f"must be an integer >= 1, got {_show(v)}")
    return v


def _optional_str(obj: dict, key: str, where: str, field: str) -> str | None:
    if key not in obj:
        return None
    v = obj[key]
    if not isinstance(v, str):
        raise _fail(where, field, f"must be a string, got {_show(v)}")
    return v


def parse_question(obj: Any, where: str, prefix: str = "") -> Question:
    if not isinstance(obj, dict):
        raise _fail(where, prefix.rstrip(".") or None, f"a question must be a JSON object, got {_show(obj)}")
    _check_keys(obj, QUESTION_FIELDS, "question", where, prefix)
    qid = _id(obj, where, prefix + "id")
    if "content" not in obj:
        raise _fail(where, prefix + "content", "missing (the question text)")
    content = obj["content"]
    if not isinstance(content, str) or not content.strip():
        raise _fail(where, prefix + "content", f"must be a non-empty string, got {_show(content)}")
    return Question(qid, content, _optional_str(obj, "system", where, prefix + "system"))


def _first_duplicate(ids: list[Id]) -> int | None:
    """Index of the first id seen before (1 and "1" are different ids)."""
    seen: set[tuple[type, Id]] = set()
    for i, x in enumerate(ids):
        if (type(x), x) in seen:
            return i
        seen.add((type(x), x))
    return None


def parse_case(obj: Any, where: str, prefix: str = "") -> Case:
    if not isinstance(obj, dict):
        raise _fail(where, prefix.rstrip(".") or None, f"a test case must be a JSON object, got {_show(obj)}")
    _check_keys(obj, CASE_FIELDS, "test case", where, prefix)
    cid = _id(obj, where, prefix + "id")
    if "questions" not in obj:
        raise _fail(where, prefix + "questions", "missing (a non-empty list of questions)")
    qs = obj["questions"]
    if not isinstance(qs, list) or not qs:
        raise _fail(where, prefix + "questions", f"must be a non-empty list of questions, got {_show(qs)}")
    questions = tuple(parse_question(q, where, f"{prefix}questions[{i}].") for i, q in enumerate(qs))
    dup = _first_duplicate([q.id for q in questions])
    if dup is not None:
        raise _fail(where, f"{prefix}questions[{dup}].id", f"duplicate question id {_show(questions[dup].id)}")
    return Case(cid, questions,
                concurrency=_positive_int(obj, "concurrency", where, prefix + "concurrency"),
                max_tokens=_positive_int(obj, "max_tokens", where, prefix + "max_tokens"),
                system=_optional_str(obj, "system", where, prefix + "system"),
                think_budget=_positive_int(obj, "think_budget", where, prefix + "think_budget"))


def _kind_of(obj: Any, where: str, field: str | None, default: str | None = None) -> str:
    """"cases" for an object with 'questions', "questions" for one with 'content', else ``default``
    (so that the parser names the missing field) or an error."""
    if isinstance(obj, dict) and "questions" in obj:
        return "cases"
    if isinstance(obj, dict) and "content" in obj:
        return "questions"
    if default is not None:
        return default
    raise _fail(where, field, "expected a test case (an object with 'questions') or a question "
                              f"(an object with 'content'), got {_show(obj)}")


def _build(path: Path, records: list[tuple[Any, str, str]], kind: str | None = None, **defaults: Any) -> Batch:
    """``records``: (object, where, field prefix), all of one kind: ``kind`` or else the first record's."""
    if not records:
        raise BatchFormatError(f"{path}: no test cases or questions")
    names = {"cases": "test cases", "questions": "questions"}
    items = []
    for obj, where, prefix in records:
        field = prefix.rstrip(".") or None
        this = _kind_of(obj, where, field, default=kind)
        if kind is None:
            kind = this
        elif this != kind:
            raise _fail(where, field, f"expected one of the file's {names[kind]}; a batch file holds test "
                                      "cases or questions, not both")
        items.append((parse_case if kind == "cases" else parse_question)(obj, where, prefix))
    dup = _first_duplicate([x.id for x in items])
    if dup is not None:
        obj, where, prefix = records[dup]
        raise _fail(where, prefix + "id", f"duplicate {'test case' if kind == 'cases' else 'question'} "
                                          f"id {_show(items[dup].id)}")
    if kind == "cases":
        return Batch(path, "cases", cases=tuple(items), **defaults)
    return Batch(path, "questions", questions=tuple(items), **defaults)


def _load_jsonl(path: Path, text: str) -> Batch:
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            hint = " (a .jsonl file holds one JSON object per line; name a single JSON document *.json)" \
                if n == 1 and line.strip() in ("[", "{") else ""
            raise _fail(where, None, f"invalid JSON: {e.msg} at column {e.colno}{hint}") from None
        if not isinstance(obj, dict):
            raise _fail(where, None, f"each line must be a JSON object, got {_show(obj)}")
        records.append((obj, where, ""))
    return _build(path, records)


def _load_json(path: Path, text: str) -> Batch:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(f"{path} line {e.lineno}", None, f"invalid JSON: {e.msg} at column {e.colno}") from None
    where = str(path)
    if isinstance(doc, list):
        return _build(path, [(obj, where, f"[{i}].") for i, obj in enumerate(doc)])
    if not isinstance(doc, dict):
        raise _fail(where, None, f"expected a list or an object with 'cases' or 'questions', got {_show(doc)}")
    _check_keys(doc, FILE_FIELDS, "batch file", where, "")
    keys = [k for k in ("cases", "questions") if k in doc]
    if len(keys) != 1:
        raise _fail(where, None, "the top-level object needs exactly one of 'cases' (test cases) "
                                 "or 'questions' (a flat list of questions)")
    key = keys[0]
    items = doc[key]
    if not isinstance(items, list) or not items:
        raise _fail(where, key, f"must be a non-empty list, got {_show(items)}")
    defaults = dict(system=_optional_str(doc, "system", where, "system"),
                    concurrency=_positive_int(doc, "concurrency", where, "concurrency"),
                    max_tokens=_positive_int(doc, "max_tokens", where, "max_tokens"),
                    think_budget=_positive_int(doc, "think_budget", where, "think_budget"))
    return _build(path, [(obj, where, f"{key}[{i}].") for i, obj in enumerate(items)], kind=key, **defaults)


def load_batch(path: str | Path) -> Batch:
    """Read and validate a batch file (``.jsonl``: one object per line; otherwise one JSON document)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"batch file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BatchFormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return _load_jsonl(path, text) if path.suffix.lower() == ".jsonl" else _load_json(path, text)
