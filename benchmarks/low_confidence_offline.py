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

The think gate (``SamplingParams(think_gate=K, think_gate_threshold=P)``: close thinking in place of the
K-th think token if the first K think tokens' geometric-mean probability is below P) is replayed the same
way with ``--gates K:P,...``, optionally on top of loop exit and a think budget as the engine combines
them (``--loop-exit --budget 96``; loop exit needs records with ``token_ids``, written since the
twentieth session), against the same setting without the gate:

    python benchmarks/low_confidence_offline.py --from-records lc_records.jsonl --gates 24:0.86,16:0.86 \
        --loop-exit --budget 96
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
                            "token_ids": list(out.token_ids),
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


def replay_gate(records: list[dict[str, Any]], gate: tuple[int, float] | None, budget: int | None,
                loop_exit: bool, answer_tokens: int) -> dict[str, Any]:
    """Loop exit, a think budget and the think gate (any of them) on unlimited records: where each output
    would be cut first (think tokens counted after a leading ``<think>`` token), right answers lost (a cut
    right answer counts as lost), and the share of all output tokens left."""
    from llmopt.reasoning.loops import find_loop

    left = lost = cut_wrong = 0
    for r in records:
        think, lps, n = r["think_tokens"], r["logprobs"], r["output_tokens"]
        cuts = []
        if loop_exit and "token_ids" in r:
            at = find_loop(r["token_ids"][1:think])
            if at is not None:
                cuts.append(at + 1)
        if budget is not None and think > budget:
            cuts.append(budget)
        if gate is not None:
            k, p = gate
            if think > k and sum(lps[1:1 + k]) / k < math.log(p):
                cuts.append(k)
        at = min(cuts) if cuts else None
        if at is None or at >= think:
            left += n
            continue
        left += at + answer_tokens
        lost += bool(r["correct"])
        cut_wrong += not r["correct"]
    return {"lost_right": lost, "cut_wrong": cut_wrong, "tokens_left": left / max(1, sum(r["output_tokens"] for r in records))}


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
    ap.add_argument("--gates", default="", help="think gates to replay, comma-separated K:P (think_gate K, "
                                              "think_gate_threshold P); rows with and without each")
    ap.add_argument("--budget", type=int, default=None, help="with --gates: a think budget under every row")
    ap.add_argument("--loop-exit", action="store_true", help="with --gates: loop exit under every row")
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
    if args.gates:
        base = ("loop exit + " if args.loop_exit else "") + (f"budget {args.budget}" if args.budget else "no budget")
        print(f"\nthink gate on {base} ({args.answer_tokens} tokens after a cut)")
        print(f"{'gate':>12} | {'right lost':>10} | {'wrong cut':>9} | output tokens left")
        for g in [None] + [(int(k), float(p)) for k, p in (x.split(":") for x in args.gates.split(",") if x)]:
            row = replay_gate(records, g, args.budget, args.loop_exit, args.answer_tokens)
            name = "none" if g is None else f"{g[0]}@{g[1]}"
            print(f"{name:>12} | {row['lost_right']:>10} | {row['cut_wrong']:>9} | {row['tokens_left']:.2f}")


if __name__ == "__main__":
    main()
