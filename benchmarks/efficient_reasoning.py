"""Efficient reasoning: accuracy and JCT over think budgets and early-exit thresholds, side by side
with unlimited thinking, on held-out math and logic items (one engine, one process, same items).

Each setting answers the same items as competition-style test cases: the items are cut into cases
of ``--case-size`` questions answered with ``--concurrency`` in flight (the batch runner's
``answer``), and JCT is the sum of the cases' wall times. The settings are interleaved case by case
(each case under every setting, in an order that rotates), so a change in the machine's load
during the run falls on all settings alike. Before each setting's run of a case the prefix cache is
reset to the same state (``--prompts``): by default it holds only the prompts' shared prefix (the
system prompt), so every setting computes its own questions, as a competition run does. Per setting it prints accuracy with a
Wilson 95% interval, the paired accuracy delta against unlimited (bootstrap 95% interval), the
JCT ratio, mean think tokens, the format rate, how often the engine closed the think part, the
probes' token cost against the think tokens saved, and the probes' prefix-cache hit rate.

    python benchmarks/efficient_reasoning.py --model smollm2-135m-reasoning --n 200 --seed 9001 \\
        --budgets 64,128,256 --thresholds 0.8,0.9,0.95
    python benchmarks/efficient_reasoning.py --model smollm2-135m-reasoning --n 200 --seed 9001 \\
        --budgets 96,64,48 --thresholds '' --loop-exit --no-unlimited-variants   # loop exit alone and + budgets

``--prefill-think`` ends every prompt with ``<think>\\n`` (for a model that does not open the think
part by itself, e.g. the base instruct model); outputs are graded as ``<think>\\n`` + output.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field, replace
from itertools import zip_longest
from typing import Any

from llmopt.batch.runner import answer
from llmopt.config import EngineConfig
from llmopt.engine.engine import LLMEngine
from llmopt.engine.sampling_params import SamplingParams
from llmopt.reasoning.budget import DEFAULT_DIFFICULTY_TOKENS
from llmopt.reasoning.format import extract_answer, format_ok
from llmopt.reasoning.loops import DEFAULT_NGRAM, DEFAULT_REPEATS
from llmopt.tasks import stats
from llmopt.tasks.evaluate import EvalConfig, _suite, build_items

PREFILL = "<think>\n"


@dataclass
class Setting:
    name: str
    think_budget: int | None = None
    threshold: float | None = None  # early exit when set
    loop_exit: bool = False
    gate: float | None = None  # think_budget_threshold: a confidence-gated budget
    cap: int | None = None  # think_budget_max of the gated budget
    jump: bool = False  # jump-forward of the format's scaffolding
    spec: bool = False  # on the engine with n-gram speculative decoding (the same greedy tokens, fewer steps)
    low_conf: float | None = None  # low_confidence_exit
    think_gate: tuple[int, float] | None = None  # think_gate, think_gate_threshold
    difficulty: tuple[float, int] | None = None  # difficulty_exit, difficulty_exit_tokens
    difficulty_budget: tuple[float, int] | None = None  # difficulty_budget_threshold, difficulty_budget


@dataclass
class Result:
    setting: Setting
    correct: list[bool] = field(default_factory=list)
    format_ok: list[bool] = field(default_factory=list)
    think: list[int] = field(default_factory=list)
    closed_by: list[str | None] = field(default_factory=list)
    out_tokens: list[int] = field(default_factory=list)
    sampled: list[int] = field(default_factory=list)  # output tokens the model decoded (not engine-written)
    probe_tokens: int = 0
    probe_prompt: int = 0
    probe_cached: int = 0
    jct_s: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)  # per item, for --records


def params_for(s: Setting, args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop=["</answer>"],
                          include_stop_str_in_output=True, think_budget=s.think_budget,
                          answer_budget=args.answer_budget if not s.name.startswith("unlimited") else None,
                          think_budget_threshold=s.gate, think_budget_max=s.cap, jump_forward=s.jump,
                          early_exit=s.threshold is not None, loop_exit=s.loop_exit,
                          loop_exit_ngram=args.loop_ngram, loop_exit_repeats=args.loop_repeats,
                          low_confidence_exit=s.low_conf,
                          **({"think_gate": s.think_gate[0], "think_gate_threshold": s.think_gate[1]}
                             if s.think_gate else {}),
                          **({"difficulty_exit": s.difficulty[0], "difficulty_exit_tokens": s.difficulty[1]}
                             if s.difficulty else {}),
                          **({"difficulty_budget_threshold": s.difficulty_budget[0],
                              "difficulty_budget": s.difficulty_budget[1]} if s.difficulty_budget else {}),
                          **({"early_exit_threshold": s.threshold} if s.threshold is not None else {}),
                          **({"early_exit_min_gap": args.min_gap} if args.min_gap else {}),
                          **({"early_exit_probe_tokens": args.probe_tokens} if args.probe_tokens else {}),
                          **({"early_exit_markers": tuple(json.loads(args.markers))} if args.markers else {}))


def shared_prefix(engine: LLMEngine, prompts: list[Any]) -> list[int]:
    """The token ids every prompt of a case starts with (the chat template and the system prompt)."""
    ids = [engine.encode_prompt(p)[0] for p in prompts]
    n = 0
    while all(len(x) > n for x in ids) and len({x[n] for x in ids}) == 1:
        n += 1
    return ids[0][:n]


def prepare_cache(engine: LLMEngine, prompts: list[Any], mode: str, prefix: list[int]) -> None:
    """The same prefix-cache state before every setting's run of a case (untimed). ``fresh``: as in a
    competition run, where each question arrives once: only the prefix all the case's prompts share (the
    system prompt) is cached, so every setting computes its questions' own tokens. ``cached``: every prompt
    of the case is cached, so the JCT is the decoding's alone. Without this, the setting that ran a case
    first paid for prompts that longer answers of other settings had evicted, and the others did not."""
    engine.reset_prefix_cache()
    if mode == "cached":
        answer(engine, prompts, SamplingParams(max_tokens=1, temperature=0.0), len(prompts))
        return
    if prefix:  # shared_prefix(engine, prompts), computed once per case by the caller
        answer(engine, [prefix], SamplingParams(max_tokens=1, temperature=0.0), 1)


def run_case(engines: dict[bool, LLMEngine], res: Result, items: list[Any], prompts: list[Any], graders: dict[str, Any],
             params: SamplingParams, args: argparse.Namespace, concurrency: int, prefix: list[int]) -> None:
    """Answer one test case (``items``, ``concurrency`` in flight) under ``res.setting`` and add it to ``res``
    (``prefix``: the case's shared prompt prefix, see prepare_cache)."""
    engine = engines[res.setting.spec]
    prepare_cache(engine, prompts, args.prompts, prefix)
    before = dict(engine.stats)
    t0 = time.perf_counter()
    outs = answer(engine, prompts, params, concurrency)
    res.jct_s += time.perf_counter() - t0
    for it, out in zip(items, outs):
        text = (PREFILL if args.prefill_think else "") + out.text
        g = graders[it.suite].grade(it, extract_answer(text), text)
        res.correct.append(g.correct)
        res.format_ok.append(format_ok(text))
        res.think.append(out.reasoning.think_tokens)
        res.closed_by.append(out.reasoning.closed_by)
        res.out_tokens.append(len(out.token_ids))
        res.sampled.append(len(out.token_ids) - out.reasoning.forced_tokens)
        res.probe_tokens += out.reasoning.probe_tokens
        res.records.append({"setting": res.setting.name, "suite": it.suite, "correct": g.correct,
                            "format_ok": res.format_ok[-1], "think_tokens": out.reasoning.think_tokens,
                            "output_tokens": len(out.token_ids), "token_ids": list(out.token_ids),
                            "closed_by": out.reasoning.closed_by, "text": text})
    res.probe_prompt += engine.stats["probe_prompt_tokens"] - before["probe_prompt_tokens"]
    res.probe_cached += engine.stats["probe_cached_tokens"] - before["probe_cached_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=20, help="items per suite (math and logic)")
    ap.add_argument("--seed", type=int, default=9001, help="item seed (held out: not a training seed)")
    ap.add_argument("--suites", default="math,logic")
    ap.add_argument("--budgets", default="64,128", help="think budgets to sweep (comma-separated, '' for none)")
    ap.add_argument("--thresholds", default="0.9", help="early-exit thresholds to sweep ('' for none)")
    ap.add_argument("--gated", default="", help="confidence-gated budgets to sweep, comma-separated "
                                                 "BUDGET:THRESHOLD:CAP (CAP may be empty: where the answer fits), "
                                                 "e.g. 64:0.9:160")
    ap.add_argument("--low-confidence", default="",
                    help="low-confidence exits to sweep, comma-separated P or P:BUDGET (low_confidence_exit P, with "
                         "think_budget BUDGET), e.g. 0.3,0.3:128")
    ap.add_argument("--think-gate", default="",
                    help="think gates to sweep, comma-separated K:P or K:P:BUDGET (think_gate K, think_gate_threshold P, "
                         "with think_budget BUDGET), e.g. 24:0.86:96")
    ap.add_argument("--difficulty-exit", default="",
                    help="difficulty exits added to every budget / gate / exit setting above, comma-separated T, "
                         "T:K or T:K:T2:B (difficulty_exit T, difficulty_exit_tokens K, default 16; with a difficulty "
                         "budget of B think tokens above P(wrong) T2): each setting runs without and with each, e.g. "
                         "0.95,0.95:16:0.8:64")
    ap.add_argument("--difficulty-probe", default=None,
                    help="difficulty probe file (default: the model's own); its training seeds are refused as --seed")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--answer-budget", type=int, default=None,
                    help="answer_budget of every setting but unlimited (tokens after thinking ends)")
    ap.add_argument("--min-gap", type=int, default=None, help="early_exit_min_gap (default: the engine's)")
    ap.add_argument("--markers", default=None, help='early_exit_markers as a JSON list, e.g. \'["\\n\\n", " "]\'')
    ap.add_argument("--probe-tokens", type=int, default=None, help="early_exit_probe_tokens (default: the engine's)")
    ap.add_argument("--loop-exit", action="store_true",
                    help="also run every setting with loop exit (and loop exit alone)")
    ap.add_argument("--skip-loop-alone", action="store_true", help="with --loop-exit: no 'loop exit' setting alone")
    ap.add_argument("--loop-ngram", type=int, default=DEFAULT_NGRAM, help="loop_exit_ngram")
    ap.add_argument("--loop-repeats", type=int, default=DEFAULT_REPEATS, help="loop_exit_repeats")
    ap.add_argument("--no-unlimited-variants", action="store_true",
                    help="with --loop-exit: skip the budget / early-exit settings without loop exit")
    ap.add_argument("--jump-forward", choices=("off", "on", "rest", "both"), default="off",
                    help="jump_forward (the format's scaffolding in one step): off; on for every setting; rest: every "
                         "setting but the plain unlimited (the reference); both: every setting without and with it "
                         "(the plain unlimited stays the reference)")
    ap.add_argument("--speculative", choices=("off", "rest", "both"), default="off",
                    help="n-gram speculative decoding (EngineConfig(speculative='ngram'), a second engine): off; rest: "
                         "every setting but the plain unlimited; both: every setting without and with it")
    ap.add_argument("--concurrency", default="4",
                    help="questions in flight per case; a comma-separated list gives case c the level c mod its "
                         "length (mixed concurrency, as a competition case file: e.g. 1,4,8)")
    ap.add_argument("--interleave", action="store_true",
                    help="alternate the suites' items (each case mixes math and logic) instead of suite after suite")
    ap.add_argument("--case-size", type=int, default=8)
    ap.add_argument("--prompts", choices=("fresh", "cached"), default="fresh",
                    help="prefix cache before each setting's run of a case: fresh (competition-style: only the "
                         "prompts' shared prefix, the system prompt, is cached; every setting computes its "
                         "questions) or cached (every prompt of the case cached: the JCT of decoding alone)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prefill-think", action="store_true")
    ap.add_argument("--json", default=None, help="write the per-setting numbers here")
    ap.add_argument("--records", default=None, help="write one JSON line per setting and item here (output text, "
                                                     "think tokens, closed_by, correct)")
    args = ap.parse_args()

    cfg = EvalConfig(model=args.model, suites=tuple(args.suites.split(",")), n=args.n, seed=args.seed)
    by_suite = build_items(cfg)
    items = [it for name in cfg.suites for it in by_suite[name]]
    if args.interleave:  # round robin over the suites: math, logic, math, logic, ...
        items = [it for group in zip_longest(*(by_suite[name] for name in cfg.suites)) for it in group if it]
    levels = [int(x) for x in str(args.concurrency).split(",") if x]
    if not levels or min(levels) < 1:
        raise SystemExit("--concurrency: one or more positive integers, comma-separated")
    graders = {name: _suite(name, cfg) for name in cfg.suites}
    engines = {spec: LLMEngine(args.model, EngineConfig(num_threads=args.threads, speculative="ngram" if spec else None,
                                                        max_num_seqs=max(EngineConfig.max_num_seqs, *levels),
                                                        difficulty_probe=args.difficulty_probe))
               for spec in ((False, True) if args.speculative != "off" else (False,))}
    engine = engines[False]
    probe = engine.difficulty_probe
    if args.difficulty_exit and probe is None:
        raise SystemExit(f"--difficulty-exit: {args.model} ships no difficulty probe; give --difficulty-probe FILE")
    if args.difficulty_exit and probe is not None and args.seed in probe.meta.get("seeds", []):
        raise SystemExit(f"--seed {args.seed} is one of the seeds the difficulty probe was trained on "
                         f"({probe.meta['seeds']}): measure it on held-out seeds")
    tok = engine.tokenizer
    prompts: list[Any] = [it.messages for it in items]
    if args.prefill_think:
        opener = tok.encode(PREFILL, add_special_tokens=False)
        prompts = [tok.apply_chat_template(m) + opener for m in prompts]
    # warm-up: loads the kernels (the prefix cache is set before every setting's run of a case: --prompts)
    for e in engines.values():
        answer(e, prompts, SamplingParams(max_tokens=1, temperature=0.0), max(levels))
    variants = [Setting(f"budget {b}", think_budget=int(b)) for b in args.budgets.split(",") if b]
    variants += [Setting(f"early exit {t}", threshold=float(t)) for t in args.thresholds.split(",") if t]
    for g in (x for x in args.gated.split(",") if x):
        b, th, cap = g.split(":")
        variants.append(Setting(f"gated {b}@{th} cap {cap or '-'}", think_budget=int(b), gate=float(th),
                                cap=int(cap) if cap else None))
    for x in (x for x in args.low_confidence.split(",") if x):
        lc, _, b = x.partition(":")
        variants.append(Setting(f"low confidence {lc}" + (f" + budget {b}" if b else ""), think_budget=int(b) if b else None,
                                low_conf=float(lc)))
    for x in (x for x in args.think_gate.split(",") if x):
        k, p, *b = x.split(":")
        variants.append(Setting(f"think gate {k}@{p}" + (f" + budget {b[0]}" if b else ""),
                                think_budget=int(b[0]) if b else None, think_gate=(int(k), float(p))))
    plain = list(variants)
    for x in (x for x in args.difficulty_exit.split(",") if x):
        t, k, *tier = x.split(":") + ([] if ":" in x else [str(DEFAULT_DIFFICULTY_TOKENS)])
        k = k or str(DEFAULT_DIFFICULTY_TOKENS)
        extra = f" + difficulty budget {tier[1]}@{tier[0]}" if tier else ""
        variants += [replace(v, name=f"{v.name} + difficulty {t}@{k}{extra}", difficulty=(float(t), int(k)),
                             difficulty_budget=(float(tier[0]), int(tier[1])) if tier else None) for v in plain]
    settings = [Setting("unlimited")]
    if not (args.loop_exit and args.no_unlimited_variants):
        settings += variants
    if args.loop_exit:
        if not args.skip_loop_alone:
            settings += [Setting("loop exit", loop_exit=True)]
        settings += [replace(v, name=f"loop exit + {v.name}", loop_exit=True) for v in variants]
    if args.jump_forward == "on":
        for s in settings:
            s.jump, s.name = True, s.name + " + jf"
    elif args.jump_forward == "rest":  # every setting but the plain unlimited (the reference) with it
        for s in settings[1:]:
            s.jump, s.name = True, s.name + " + jf"
    elif args.jump_forward == "both":  # every setting without and with it; the plain unlimited is the reference
        settings = [x for s in settings for x in (s, replace(s, name=s.name + " + jf", jump=True))]
    if args.speculative == "rest":
        for s in settings[1:]:
            s.spec, s.name = True, s.name + " + spec"
    elif args.speculative == "both":
        settings = [x for s in settings for x in (s, replace(s, name=s.name + " + spec", spec=True))]
    # interleaved: every case is answered under every setting before the next case (the order of the
    # settings rotates from case to case), so a change in the machine's load hits all settings alike
    results = [Result(s) for s in settings]
    params = [params_for(s, args) for s in settings]
    starts = list(range(0, len(items), args.case_size))
    if args.records:  # written case by case: a run cut short still leaves every finished case
        open(args.records, "w", encoding="utf-8").close()
    for c, start in enumerate(starts):
        end = start + args.case_size
        prefix = shared_prefix(next(iter(engines.values())), prompts[start:end])
        for j in range(len(settings)):
            # at each concurrency level the first setting cycles through all of them (case c runs at level
            # c mod L: its round c // L shifts the order), whatever the numbers of settings and levels
            i = (j + c % len(levels) + c // len(levels)) % len(settings)
            run_case(engines, results[i], items[start:end], prompts[start:end], graders, params[i], args,
                     levels[c % len(levels)], prefix)
        if args.records:
            with open(args.records, "a", encoding="utf-8") as f:
                for r in results:
                    for rec in r.records[start:end]:
                        f.write(json.dumps(rec | {"case": c}) + "\n")
        print(f"# case {c + 1}/{len(starts)}: " + ", ".join(f"{r.setting.name} {r.jct_s:.1f} s" for r in results),
              flush=True)

    base = results[0]
    header = ("setting", "acc", "95% CI", "d acc vs unl. [95% CI]", "JCT s", "JCT ratio", "out tok ratio",
              "decoded ratio", "think tok",
              "format", "closed by engine", "loop exits (acc)", "gate / difficulty exits (right)",
              "probe tok / saved", "probe hit")
    rows = []
    out_json = []
    for r in results:
        n = len(r.correct)
        acc = sum(r.correct) / n
        lo, hi = stats.wilson_interval(sum(r.correct), n)
        d, (dlo, dhi) = stats.paired_bootstrap_delta([float(x) for x in r.correct], [float(x) for x in base.correct])
        saved = sum(base.think) - sum(r.think)
        engine_closed = sum(1 for c in r.closed_by if c not in (None, "model")) / n
        looped = [i for i, c in enumerate(r.closed_by) if c == "loop"]
        loop_acc = sum(r.correct[i] for i in looped) / len(looped) if looped else None
        gated = [i for i, c in enumerate(r.closed_by) if c == "think_gate"]
        judged = [i for i, c in enumerate(r.closed_by) if c == "difficulty"]
        exits = (f"{len(gated)} ({sum(r.correct[i] for i in gated)}) / {len(judged)} "
                 f"({sum(r.correct[i] for i in judged)})")
        hit = r.probe_cached / r.probe_prompt if r.probe_prompt else None
        rows.append((r.setting.name, f"{acc:.3f}", f"[{lo:.3f}, {hi:.3f}]", f"{d:+.3f} [{dlo:+.3f}, {dhi:+.3f}]",
                     f"{r.jct_s:.1f}", f"{r.jct_s / base.jct_s:.2f}", f"{sum(r.out_tokens) / sum(base.out_tokens):.2f}",
                     f"{sum(r.sampled) / sum(base.sampled):.2f}", f"{sum(r.think) / n:.1f}",
                     f"{sum(r.format_ok) / n:.2f}", f"{engine_closed:.2f}",
                     f"{len(looped) / n:.3f} ({loop_acc:.2f})" if looped else "-", exits,
                     f"{r.probe_tokens}/{saved}" if r.probe_prompt else "-",
                     f"{hit:.2f}" if hit is not None else "-"))
        out_json.append({"setting": r.setting.name, "think_budget": r.setting.think_budget,
                         "early_exit_threshold": r.setting.threshold,
                         "think_budget_threshold": r.setting.gate, "think_budget_max": r.setting.cap,
                         "jump_forward": r.setting.jump, "n": n, "accuracy": acc,
                         "accuracy_ci95": [lo, hi], "delta_vs_unlimited": d, "delta_ci95": [dlo, dhi],
                         "jct_s": r.jct_s, "jct_ratio": r.jct_s / base.jct_s,
                         "output_token_ratio": sum(r.out_tokens) / sum(base.out_tokens),
                         "decoded_token_ratio": sum(r.sampled) / sum(base.sampled), "mean_think_tokens": sum(r.think) / n,
                         "format_rate": sum(r.format_ok) / n, "engine_closed_rate": engine_closed,
                         "loop_exit": r.setting.loop_exit, "loop_exit_rate": len(looped) / n,
                         "difficulty_exit": r.setting.difficulty,
                         "difficulty_exit_rate": r.closed_by.count("difficulty") / n,
                         "think_gate_exit_rate": r.closed_by.count("think_gate") / n,
                         "loop_exit_accuracy": loop_acc,
                         "probe_tokens": r.probe_tokens, "think_tokens_saved": saved, "probe_prefix_hit_rate": hit})
    print(f"\nmodel {args.model}, suites {args.suites}, n={args.n} per suite ({len(items)} items), seed {args.seed}, "
          f"max_tokens {args.max_tokens}, cases of {args.case_size} at concurrency {args.concurrency}"
          f"{' (cycled case by case)' if len(levels) > 1 else ''}{', suites interleaved' if args.interleave else ''}, "
          f"prefill_think={args.prefill_think}, threads={engine.config.num_threads}, min_gap={args.min_gap}, "
          f"probe_tokens={args.probe_tokens}, markers={args.markers}, loop_ngram={args.loop_ngram}, "
          f"loop_repeats={args.loop_repeats}, answer_budget={args.answer_budget} (all but unlimited), "
          f"jump_forward={args.jump_forward}, speculative={args.speculative}")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "settings": out_json}, f, indent=1)


if __name__ == "__main__":
    main()
