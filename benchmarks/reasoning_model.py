"""The trained reasoning model against the base model: format and accuracy on held-out eval items.

Two parts, both on the items of ``llmopt eval`` (math, logic: reasoning-gym eval seeds; code:
HumanEval), greedy, unguided:

1. ``--compare CAND.json BASE.json``: paired deltas of two ``llmopt eval --json`` runs on the
   same items (e.g. trained zero-shot vs base few-shot), per suite: accuracy and format rate,
   each with a paired-bootstrap 95% interval and McNemar's exact p.
2. ``--no-system MODEL``: the same items with the system message removed (the chat template's
   own default system prompt applies), format rate and accuracy per suite with Wilson 95%
   intervals.

    python benchmarks/reasoning_model.py --compare runs/trained.json runs/base.json
    python benchmarks/reasoning_model.py --no-system smollm2-135m-reasoning --n 40 --seed 0
"""

from __future__ import annotations

import argparse
import json
import time


def compare(cand_path: str, base_path: str) -> None:
    from llmopt.tasks import stats

    cand = json.load(open(cand_path))
    base = json.load(open(base_path))
    print(f"candidate: {cand_path}\nbaseline:  {base_path}")
    print(f"{'suite':6} {'metric':8} {'n':>4} {'cand':>6} {'base':>6} {'delta':>7}  95% CI            McNemar p")
    for suite in cand["suites"]:
        ci = [r for r in cand["items"] if r["suite"] == suite]
        bi = [r for r in base["items"] if r["suite"] == suite]
        if [r["id"] for r in ci] != [r["id"] for r in bi]:
            raise SystemExit(f"suite {suite}: the runs hold different items (use the same --n and --seed)")
        for key, label in (("correct", "accuracy"), ("format_ok", "format")):
            a = [float(bool(r[key])) for r in ci]
            b = [float(bool(r[key])) for r in bi]
            d, (lo, hi) = stats.paired_bootstrap_delta(a, b)
            p = stats.mcnemar_exact([x == 1.0 for x in a], [x == 1.0 for x in b])["p_value"]
            print(f"{suite:6} {label:8} {len(a):>4} {sum(a) / len(a):6.1%} {sum(b) / len(b):6.1%} {d:+7.1%}  "
                  f"[{lo:+.1%}, {hi:+.1%}]  {p:.3g}")


def no_system(model: str, n: int, seed: int, max_tokens: int, suites: list[str]) -> None:
    from llmopt import LLM, SamplingParams
    from llmopt.reasoning.format import extract_answer, format_ok
    from llmopt.tasks import stats
    from llmopt.tasks.evaluate import EvalConfig, _suite, build_items

    cfg = EvalConfig(model=model, suites=tuple(suites), n=n, seed=seed, max_tokens=max_tokens)
    items = build_items(cfg)
    llm = LLM(model)
    print(f"{model}: no system prompt, n={n} per suite, seed={seed}, greedy, max_tokens={max_tokens}")
    for name, its in items.items():
        suite = _suite(name, cfg)
        convs = [[m for m in it.messages if m["role"] != "system"] for it in its]
        t0 = time.perf_counter()
        outs = llm.chat(convs, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        dt = time.perf_counter() - t0
        fmt = [format_ok(o.text) for o in outs]
        acc = [suite.grade(it, extract_answer(o.text), o.text).correct for it, o in zip(its, outs)]
        flo, fhi = stats.wilson_interval(sum(fmt), len(fmt))
        alo, ahi = stats.wilson_interval(sum(acc), len(acc))
        print(f"  {name:6} format {sum(fmt)}/{len(fmt)} = {sum(fmt) / len(fmt):.1%} [{flo:.1%}, {fhi:.1%}]   "
              f"accuracy {sum(acc)}/{len(acc)} = {sum(acc) / len(acc):.1%} [{alo:.1%}, {ahi:.1%}]   ({dt:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", nargs=2, metavar=("CANDIDATE_JSON", "BASELINE_JSON"))
    ap.add_argument("--no-system", metavar="MODEL")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--suites", default="math,logic,code")
    a = ap.parse_args()
    if not a.compare and not a.no_system:
        ap.error("give --compare and/or --no-system")
    if a.compare:
        compare(*a.compare)
    if a.no_system:
        no_system(a.no_system, a.n, a.seed, a.max_tokens, a.suites.split(","))


if __name__ == "__main__":
    main()
