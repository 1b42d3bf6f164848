"""Where does a reasoning model guess? Offline evidence for the low-confidence exit.

Answers held-out math and logic items greedily with unlimited thinking, recording the probability
of every chosen token (``logprobs=0``), then replays the low-confidence exit (close thinking in
place of the first think token chosen below ``p``) on those records for a range of ``p``: how many
wrong and how many right answers it would cut, and what share of all output tokens it would save
(the tokens after the cut, minus ``--answer-tokens`` for the answer that follows). An exit that cuts
a right answer is counted as losing it (an upper bound: the answer after the cut is sometimes still
right). No engine runs with the exit here; `benchmarks/efficient_reasoning.py --low-confidence`
measures the real thing (accuracy and JCT, side by side).

    python benchmarks/low_confidence_offline.py --model smollm2-135m-reasoning --n 200 --seed 9004 \\
        --records lc_records.jsonl
    python benchmarks/low_confidence_offline.py --from-records lc_records.jsonl   # replay only
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

DEFAULT_THRESHOLDS = "0.1,0.15,0.2,0.3,0.4,0.5,0.6"


def collect(args: argparse.Namespace) -> list[dict[str, Any]]:
    from llmopt.batch.runner import answer
    from llmopt.config import EngineConfig
    from llmopt.engine.engine import LLMEngine
    from llmopt.engine.sampling_params import SamplingParams
    from llmopt.reasoning.format import extract_answer
    from llmopt.tasks.evaluate import EvalConfig, _suite, build_items

    cfg = EvalConfig(model=args.model, suites=tuple(args.suites.split(",")), n=args.n, seed=args.seed)
    by_suite = build_items(cfg)
    engine = LLMEngine(args.model, EngineConfig(num_threads=args.threads))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop=["</answer>"],
                            include_stop_str_in_output=True, logprobs=0)
    records = []
    for suite in cfg.suites:
        grader = _suite(suite, cfg)
        items = by_suite[suite]
        outs = answer(engine, [it.messages for it in items], params, args.concurrency)
        for it, out in zip(items, outs):
            assert out.logprobs is not None and out.reasoning is not None
            g = grader.grade(it, extract_answer(out.text), out.text)
            records.append({"suite": suite, "task": getattr(it, "task", None), "correct": bool(g.correct),
                            "output_tokens": len(out.token_ids), "think_tokens": out.reasoning.think_tokens,
                            "logprobs": [round(lp.logprob, 5) for lp in out.logprobs], "text": out.text})
    return records


def replay(records: list[dict[str, Any]], p: float, answer_tokens: int) -> dict[str, Any]:
    """The exit at ``p`` on unlimited records: cuts per suite and outcome, tokens saved."""
    cut = {"right": 0, "wrong": 0}
    saved = 0
    for r in records:
        think = r["logprobs"][:r["think_tokens"]]
        at = next((i for i, lp in enumerate(think) if lp < math.log(p)), None)
        if at is None:
            continue
        cut["right" if r["correct"] else "wrong"] += 1
        saved += max(0, r["output_tokens"] - (at + answer_tokens))
    return {"p": p, "cuts_right": cut["right"], "cuts_wrong": cut["wrong"],
            "saved_share": saved / max(1, sum(r["output_tokens"] for r in records))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-reasoning")
    ap.add_argument("--n", type=int, default=200, help="items per suite")
    ap.add_argument("--seed", type=int, default=9004, help="item seed (held out: not a training seed)")
    ap.add_argument("--suites", default="math,logic")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--thresholds", default=DEFAULT_THRESHOLDS, help="values of p to replay, comma-separated")
    ap.add_argument("--answer-tokens", type=int, default=8,
                    help="tokens an answer after a cut is assumed to take (closing text included)")
    ap.add_argument("--records", default=None, help="write the unlimited records (with logprobs) here")
    ap.add_argument("--from-records", default=None, help="replay records written before (no model run)")
    args = ap.parse_args()

    if args.from_records:
        with open(args.from_records, encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
    else:
        records = collect(args)
        if args.records:
            with open(args.records, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
    for suite in sorted({r["suite"] for r in records}):
        rs = [r for r in records if r["suite"] == suite]
        right = [r for r in rs if r["correct"]]
        print(f"{suite}: {len(rs)} items, {len(right)} right ({sum(r['output_tokens'] for r in right)} output "
              f"tokens), {len(rs) - len(right)} wrong ({sum(r['output_tokens'] for r in rs if not r['correct'])})")
    print(f"\n{'p':>5} | {'cuts wrong':>10} | {'cuts right':>10} | tokens saved")
    for p in (float(x) for x in args.thresholds.split(",") if x):
        row = replay(records, p, args.answer_tokens)
        print(f"{p:>5} | {row['cuts_wrong']:>10} | {row['cuts_right']:>10} | {row['saved_share']:.0%}")


if __name__ == "__main__":
    main()
