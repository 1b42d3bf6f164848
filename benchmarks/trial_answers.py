"""Would a confidence-gated think budget help? Trial answers at budget points, on the greedy outputs.

Answers held-out math + logic items greedily with loop exit (the reference outputs), then, for every
output still thinking at a budget point (32, 48, ... tokens), decodes the trial answer a gated budget
would try there (the output's tokens so far + ``</think>\\n<answer>\\n``, greedy, with logprobs) and
grades it. Prints, per point, how confident and how right the trial answers are per task, and
simulates plain budgets and gated budgets (cut at the first trial answer above the threshold, else at
the cap) in accuracy and output tokens against the reference. Token counts only: no timing, so the
machine's load does not matter.

    python benchmarks/trial_answers.py --n 100 --seed 9001 --thresholds 0.8,0.9,0.95
"""

from __future__ import annotations

import argparse
import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from llmopt.batch.runner import answer
from llmopt.config import EngineConfig
from llmopt.engine.engine import LLMEngine
from llmopt.engine.sampling_params import SamplingParams
from llmopt.reasoning.budget import CLOSE_TEXT
from llmopt.reasoning.early_exit import trial_confidence
from llmopt.reasoning.format import extract_answer
from llmopt.tasks.evaluate import EvalConfig, _suite, build_items


@dataclass
class Ref:
    task: str
    correct: bool
    think: int
    out: int
    trials: dict[int, tuple[float | None, bool, int]] = field(default_factory=dict)  # point: (conf, correct, tokens)


def simulate(refs: list[Ref], budget: int, threshold: float | None, cap: int, gap: int,
             close_len: int) -> tuple[int, int, int]:
    """(correct, output tokens, probe tokens) of a plain (threshold None) or gated budget."""
    correct = tokens = probe = 0
    for r in refs:
        p, done = budget, False
        while threshold is not None and p < min(r.think, cap) and p in r.trials:
            conf, ok, n = r.trials[p]
            if conf is not None and conf > threshold:
                correct, tokens, done = correct + ok, tokens + p + close_len + n, True
                break
            probe += close_len + n
            p += gap
        if done:
            continue
        cut = budget if threshold is None else cap
        if r.think <= cut or cut not in r.trials:
            correct, tokens = correct + r.correct, tokens + r.out
        else:
            correct, tokens = correct + r.trials[cut][1], tokens + cut + close_len + r.trials[cut][2]
    return correct, tokens, probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-reasoning")
    ap.add_argument("--n", type=int, default=100, help="items per suite")
    ap.add_argument("--seed", type=int, default=9001)
    ap.add_argument("--suites", default="math,logic")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--answer-budget", type=int, default=24)
    ap.add_argument("--probe-tokens", type=int, default=24)
    ap.add_argument("--gap", type=int, default=16, help="tokens between budget points (and gated re-tries)")
    ap.add_argument("--budgets", default="32,48,64", help="first budget points of the gated budgets")
    ap.add_argument("--thresholds", default="0.8,0.9,0.95")
    ap.add_argument("--caps", default="96,160")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    cfg = EvalConfig(model=args.model, suites=tuple(args.suites.split(",")), n=args.n, seed=args.seed)
    by_suite = build_items(cfg)
    items = [it for name in cfg.suites for it in by_suite[name]]
    graders = {name: _suite(name, cfg) for name in cfg.suites}
    eng = LLMEngine(args.model, EngineConfig(num_threads=args.threads, max_num_seqs=32))
    tok = eng.tokenizer
    ref_params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop=["</answer>"],
                                include_stop_str_in_output=True, loop_exit=True, answer_budget=args.answer_budget)
    outs = answer(eng, [it.messages for it in items], ref_params, 32)
    refs, probes, where = [], [], []
    points = list(range(args.gap * 2, args.max_tokens, args.gap))
    for i, (it, o) in enumerate(zip(items, outs)):
        g = graders[it.suite].grade(it, extract_answer(o.text), o.text)
        refs.append(Ref(it.task, g.correct, o.reasoning.think_tokens, len(o.token_ids)))
        for p in (p for p in points if p < o.reasoning.think_tokens):
            probes.append(list(o.prompt_token_ids) + list(o.token_ids[:p]) + eng.close_ids)
            where.append((i, p, tok.decode(list(o.token_ids[:p]))))
    trial_params = SamplingParams(max_tokens=args.probe_tokens, temperature=0.0, stop=["</answer>"],
                                  include_stop_str_in_output=True, logprobs=0)
    for (i, p, prefix), po in zip(where, answer(eng, probes, trial_params, 32)):
        conf = trial_confidence([lp.logprob for lp in po.logprobs or []], [tok.decode([x]) for x in po.token_ids])
        text = prefix + CLOSE_TEXT + po.text
        g = graders[items[i].suite].grade(items[i], extract_answer(text), text)
        refs[i].trials[p] = (conf, g.correct, len(po.token_ids))

    print(f"model {args.model}, seed {args.seed}, n={args.n} per suite ({len(items)} items), loop exit, "
          f"answer_budget {args.answer_budget}; {len(probes)} trial answers")
    for p in (p for p in points if any(p in r.trials for r in refs)):
        per: dict[str, list[tuple[float | None, bool, int]]] = defaultdict(list)
        for r in refs:
            if p in r.trials:
                per[r.task].append(r.trials[p])
        cells = [f"{t} {sum(ok for _, ok, _ in v)}/{len(v)} right, conf>0.9 {sum((c or 0) > 0.9 for c, _, _ in v)}"
                 for t, v in sorted(per.items())]
        print(f"at {p}: " + "; ".join(cells))
    base_c, base_t = sum(r.correct for r in refs), sum(r.out for r in refs)
    close_len = len(eng.close_ids)
    print(f"\nreference (loop exit): {base_c} right, {base_t} output tokens")
    rows: list[Any] = []
    for b in sorted({int(x) for x in args.budgets.split(",")} | {64, 80, 96}):
        c, t, _ = simulate(refs, b, None, b, args.gap, close_len)
        rows.append((f"budget {b}", c, t, 0))
    for b, th, cap in itertools.product(args.budgets.split(","), args.thresholds.split(","), args.caps.split(",")):
        c, t, pr = simulate(refs, int(b), float(th), int(cap), args.gap, close_len)
        rows.append((f"gated {b}@{th} cap {cap}", c, t, pr))
    for name, c, t, pr in rows:
        print(f"{name:24s} right {c:4d} ({c - base_c:+d})  tokens {t / base_t:.3f}  + probes {(t + pr) / base_t:.3f}")


if __name__ == "__main__":
    main()
