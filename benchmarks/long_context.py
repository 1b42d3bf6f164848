"""Long-context measurements: retrieval accuracy, long-text perplexity, decode speed and KV memory
for KV cache policies (full / streaming / snapkv / h2o / quest / quest+pinF) and KV element types, side by side in one run.

    python benchmarks/long_context.py retrieval --suite passkey --lengths 1024,2048 --depths 0,0.5,1 --n 1
    python benchmarks/long_context.py ppl --tokens 2048 --n 2 --kv-dtypes float32,int8
    python benchmarks/long_context.py --threads 1 decode --context 2048,4096,8192 --new 32 \
        --kv-dtypes float32,int8 --policies full,snapkv
    python benchmarks/long_context.py memory
    python benchmarks/long_context.py --threads 1 attention --context 8192

Every subcommand prints a table and, with ``--json``, writes the raw numbers. Accuracy comes with n,
the seed and a Wilson 95% interval; speed only as ratios to the full-KV row of the same run.
Compressed policies are per-request overrides on one engine (one model load, same weights); with
quest among them that engine is built with kv_policy 'quest' (it keeps the per-block key summaries).
Quest keeps every row (its "KV rows" column is 1.00): it saves reads per decode step, not memory.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

from llmopt import LLM, SamplingParams
from llmopt.config import parse_kv_budget
from llmopt.tasks.longctx import ANSWER_TOKENS, RetrievalSuite, cell_accuracy, long_text
from llmopt.tasks.stats import wilson_interval


def _policies(text: str, budget: float | int) -> list[tuple[str, float | int | None]]:
    out: list[tuple[str, float | int | None]] = []
    for p in text.split(","):
        p = p.strip()
        out.append((p, None if p == "full" else budget))
    return out


def _policy_params(label: str) -> dict[str, Any]:
    """SamplingParams fields of a policy label: ``quest+pin0.25`` is Quest with a quarter of each step's
    block budget pinned by the prompt's vote (``kv_quest_pin``); other labels are the policy itself."""
    if label.startswith("quest+pin"):
        return {"kv_policy": "quest", "kv_quest_pin": float(label[len("quest+pin"):])}
    return {"kv_policy": label}


def _quest_engine(policies: list[tuple[str, float | int | None]]) -> dict[str, Any]:
    """EngineConfig fields for an engine that serves kv_policy 'quest' requests (it keeps the key
    summaries; the other policies stay per-request overrides on it)."""
    budgets = [b for p, b in policies if p.startswith("quest")]
    return {"kv_policy": "quest", "kv_budget": budgets[0]} if budgets else {}


def retrieval(args: argparse.Namespace) -> dict[str, Any]:
    budget = parse_kv_budget(args.budget)
    assert budget is not None
    policies = _policies(args.policies, budget)
    llm = LLM(args.model, num_threads=args.threads, kv_dtype=args.kv_dtype, max_num_seqs=args.batch,
              kv_cache_memory_gb=args.kv_gb, **_quest_engine(policies))
    tok = llm.tokenizer
    suite = RetrievalSuite(args.suite, tok, tuple(int(x) for x in args.lengths.split(",")),
                           tuple(float(x) for x in args.depths.split(",")))
    items = suite.items(args.n, args.seed)
    prompts = [tok.apply_chat_template(it.messages) + tok.encode(it.payload["answer_prefix"], add_special_tokens=False)
               for it in items]
    rows = []
    for policy, b in policies:
        params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0, kv_budget=b, **_policy_params(policy))
        recs = []
        t0 = time.perf_counter()
        for start in range(0, len(items), args.batch):
            outs = llm.generate(prompts[start:start + args.batch], params)
            for it, out in zip(items[start:start + args.batch], outs):
                g = suite.grade(it, None, out.text)
                recs.append({"length": it.payload["length"], "depth": it.payload["depth"], "correct": g.correct,
                             "prompt_tokens": it.payload["prompt_tokens"], "kv_tokens": out.kv_tokens,
                             "output": out.text})
                print(f"  {policy} {it.id}: {'right' if g.correct else 'wrong'} ({it.reference} -> {out.text!r})",
                      flush=True)
            print(f"  {policy}: {len(recs)}/{len(items)} done", flush=True)
        k = sum(r["correct"] for r in recs)
        lo, hi = wilson_interval(k, len(recs))
        row = {"policy": policy, "budget": b, "n": len(recs), "correct": k, "accuracy": k / len(recs),
               "ci95": [lo, hi], "cells": cell_accuracy(recs),
               "kv_fraction": sum(r["kv_tokens"] / r["prompt_tokens"] for r in recs) / len(recs),
               "wall_s": time.perf_counter() - t0, "items": recs}
        rows.append(row)
    print(f"\n{args.suite}: n={args.n} per (length, depth) cell, seed={args.seed}, lengths {args.lengths}, "
          f"depths {args.depths}, kv_dtype {args.kv_dtype}")
    lengths = sorted({c["length"] for c in rows[0]["cells"]})
    print("| policy | budget | KV rows / prompt | " + " | ".join(f"{L}" for L in lengths) + " | all (95% CI) | wall s |")
    print("|---|---|---|" + "---|" * len(lengths) + "---|---|")
    for r in rows:
        per_len = []
        for L in lengths:
            cs = [c for c in r["cells"] if c["length"] == L]
            per_len.append(f"{sum(c['accuracy'] * c['n'] for c in cs):.0f}/{sum(c['n'] for c in cs)}")
        print(f"| {r['policy']} | {r['budget'] or '-'} | {r['kv_fraction']:.2f} | " + " | ".join(per_len)
              + f" | {r['accuracy']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | {r['wall_s']:.0f} |")
    return {"kind": "retrieval", "args": vars(args), "rows": rows}


def ppl(args: argparse.Namespace) -> dict[str, Any]:
    ids_all = None
    rows = []
    for dtype in args.kv_dtypes.split(","):
        llm = LLM(args.model, num_threads=args.threads, kv_dtype=dtype.strip())
        if ids_all is None:
            ids_all = llm.tokenizer.encode(long_text(args.seed), add_special_tokens=False)
        nll, cnt, t0 = 0.0, 0, time.perf_counter()
        for i in range(args.n):
            ids = ids_all[i * args.tokens:(i + 1) * args.tokens]
            lp = llm.score(ids)
            nll -= float(lp.double().sum())
            cnt += len(ids) - 1
        rows.append({"kv_dtype": dtype, "ppl": math.exp(nll / cnt), "tokens": cnt,
                     "bytes_per_token": llm.engine.kv_info()["bytes_per_token"], "wall_s": time.perf_counter() - t0})
        del llm
    base = rows[0]["ppl"]
    print(f"\nlong-text perplexity: {args.n} windows of {args.tokens} tokens, pydoc topics concatenated (seed {args.seed})")
    print("| KV dtype | KV bytes/token | ppl | vs first row |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['kv_dtype']} | {r['bytes_per_token']} | {r['ppl']:.4f} | {100 * (r['ppl'] / base - 1):+.2f}% |")
    return {"kind": "ppl", "args": vars(args), "rows": rows}


class _StepTimer:
    """Wraps a ``FusedDecoder``'s native step: the time its ``run`` calls take (instrumentation of
    the real step, which still does all the work)."""

    def __init__(self, step: Any):
        self.step = step
        self.seconds = 0.0

    def run(self, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.step.run(*args)
        finally:
            self.seconds += time.perf_counter() - t0


def _median(xs: list[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else (ys[n // 2 - 1] + ys[n // 2]) / 2


def decode(args: argparse.Namespace) -> dict[str, Any]:
    """Single-stream decode speed per (context, KV dtype, policy) row, the rows' decode steps
    alternated one by one in one run: one engine per row holds one sequence; after every row's
    prefill, each round steps every row once (round r starts at row r mod rows), so load changes
    hit all rows alike. A row's time per token is the median of its ``--new`` step times; speed is
    reported as a ratio to the full-KV row of the first dtype at the same context. Where the time goes:
    the native decode step's share of a token (the rest: head, sampling, Python), and attention =
    step time minus the step time of the same dtype at ``--short`` tokens of context."""
    from llmopt.engine.fused_decode import FusedDecoder

    dtypes = [d.strip() for d in args.kv_dtypes.split(",")]
    budget = parse_kv_budget(args.budget)
    assert budget is not None
    contexts = [int(c) for c in str(args.context).split(",")]
    kinds = [(dt, policy, b) for dt in dtypes for policy, b in _policies(args.policies, budget)]
    if args.short:
        kinds += [(dt, "short", None) for dt in dtypes]
    engines, timers = {}, {}
    for kind in kinds:
        # KV blocks for this row's one sequence only (six engines live side by side)
        tokens = (args.short if kind[1] == "short" else max(contexts)) + args.new + 2 * 64
        llm = LLM(args.model, num_threads=args.threads, kv_dtype=kind[0], enable_prefix_caching=False,
                  num_kv_blocks=-(-tokens // 16), block_size=16, max_num_seqs=1,
                  **_quest_engine([kind[1:]]))
        # warm-up: native kernels are built / loaded on their first call, which must not land in a step
        llm.generate([list(range(100, 164))], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        fused: FusedDecoder | None = llm.engine.runner.fused
        if fused is not None:
            timers[kind] = fused.step = _StepTimer(fused.step)  # type: ignore[assignment]
        engines[kind] = llm
    text_ids = engines[kinds[0]].tokenizer.encode(long_text(args.seed), add_special_tokens=False)
    rows = []
    for ctx_len in contexts:
        room = engines[kinds[0]].engine.max_model_len - args.new - 1  # the prompt + every new token must fit
        ids = text_ids[:min(ctx_len, room)]
        if len(ids) < min(ctx_len, room):
            raise SystemExit(f"the long text has {len(text_ids)} tokens, fewer than --context {ctx_len}")
        seqs = {}
        for kind, llm in engines.items():  # prefills (not timed)
            dt, policy, b = kind
            pp = {} if policy in ("full", "short") else _policy_params(policy)
            params = SamplingParams(max_tokens=args.new + 1, temperature=0.0, ignore_eos=True, kv_budget=b, **pp)
            seqs[kind] = llm.engine.add_request(ids[-args.short:] if policy == "short" else ids, params)
            while not seqs[kind].output_ids:
                llm.engine.step()
        times: dict[Any, list[float]] = {k: [] for k in kinds}
        native: dict[Any, float] = {k: 0.0 for k in kinds}
        fused_steps = {k: e.engine.runner.fused.steps if e.engine.runner.fused else 0 for k, e in engines.items()}
        for r in range(args.new):
            order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
            for kind in order:
                eng, timer = engines[kind].engine, timers.get(kind)
                before = timer.seconds if timer else 0.0
                t0 = time.perf_counter()
                eng.step()
                times[kind].append(time.perf_counter() - t0)
                if timer:
                    native[kind] += timer.seconds - before
        for kind, llm in engines.items():
            assert not llm.engine.has_unfinished(), "a row did not finish in --new steps"
            fused = llm.engine.runner.fused
            steps = fused.steps - fused_steps[kind] if fused else 0
            dt, policy, b = kind
            t = _median(times[kind])
            rows.append({"context": len(ids) if policy != "short" else args.short, "kv_dtype": dt, "policy": policy,
                         "budget": b, "kv_tokens": seqs[kind].kv_rows_at_finish, "new": args.new, "tpot_s": t,
                         "decode_tok_s": 1 / t, "step_times_s": times[kind], "fused_steps": steps,
                         "fallbacks": dict(fused.fallbacks) if fused else None,
                         "native_share": native[kind] / sum(times[kind]), "native_s": native[kind] / args.new,
                         "at": ctx_len})
        print(f"  context {ctx_len}: done", flush=True)
    print(f"\nsingle-stream decode, {args.new} new tokens per row, {args.threads} thread(s), rows' steps alternated; "
          f"speed = median step time, as a ratio to the {kinds[0][0]} {kinds[0][1]} row at the same context")
    print("| context | KV dtype | policy | budget | KV rows at end | path | speed vs first row | "
          "native step / token | attention / token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ctx_len in contexts:
        group = [r for r in rows if r["at"] == ctx_len]
        base = group[0]["decode_tok_s"]
        short = {r["kv_dtype"]: r for r in group if r["policy"] == "short"}
        for r in group:
            path = (f"fused ({r['fused_steps']} steps)" if r["fused_steps"] == args.new and not r["fallbacks"]
                    else f"op by op / mixed ({r['fused_steps']} fused, fallbacks {r['fallbacks']})")
            att = "-"
            s = short.get(r["kv_dtype"])
            if s is not None and r["policy"] != "short" and r["fused_steps"] and s["fused_steps"]:
                att = f"{100 * max(0.0, r['native_s'] - s['native_s']) / r['tpot_s']:.0f}%"
            ctx_col = r["context"] if r["policy"] != "short" else f"{ctx_len} (row at {args.short})"
            print(f"| {ctx_col} | {r['kv_dtype']} | {r['policy']} | {r['budget'] or '-'} | {r['kv_tokens']} | {path} | "
                  f"{r['decode_tok_s'] / base:.2f}x | {100 * r['native_share']:.0f}% | {att} |")
    return {"kind": "decode", "args": vars(args), "rows": rows}


def attention(args: argparse.Namespace) -> dict[str, Any]:
    """The decode attention alone (what grows with the context): one query token against a paged
    cache of ``--context`` random tokens for every layer, float32 kernel vs the 8-bit kernel on int8
    and fp8 (e4m3) codes, on the model's shape (SmolLM2-135M by default), best of ``--reps``
    interleaved repetitions."""
    import torch

    from llmopt.kernels import kv_quant, ops

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    L, Hq, Hk, D, BS = args.layers, args.q_heads, args.kv_heads, args.head_dim, 16
    nb = (args.context + BS - 1) // BS
    kf, vf = torch.randn(L, nb, BS, Hk, D), torch.randn(L, nb, BS, Hk, D)
    codes = {name: (kv_quant.quantize_kv(kf, dt), kv_quant.quantize_kv(vf, dt))
             for name, dt in (("int8", torch.int8), ("fp8", kv_quant.FP8))}
    tables = torch.arange(nb, dtype=torch.int32)[None]
    lens = torch.tensor([args.context], dtype=torch.int32)
    q, scale = torch.randn(1, Hq, D), D ** -0.5

    def fp32() -> None:
        for i in range(L):
            ops.paged_decode_attention(q, kf[i], vf[i], tables, lens, scale)

    def coded(name: str):
        (kq, ks), (vq, vs) = codes[name]

        def run() -> None:
            for i in range(L):
                kv_quant.paged_decode_attention_int8(q, kq[i], vq[i], ks[i], vs[i], tables, lens, scale)
        return run

    runs = {"float32": fp32, "int8": coded("int8"), "fp8": coded("fp8")}
    best = {k: math.inf for k in runs}
    for fn in runs.values():
        fn()  # warm-up: builds / loads the native kernels
    for _ in range(args.reps):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    rows = [{"kv_dtype": k, "ms_per_token": 1e3 * v, "native_int8": kv_quant.native_available()}
            for k, v in best.items()]
    print(f"\ndecode attention at {args.context} tokens of context, {L} layers x {Hq} q / {Hk} kv heads x {D}, "
          f"{args.threads} thread(s), best of {args.reps}")
    print("| KV dtype | attention ms / token | speed vs float32 |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['kv_dtype']} | {r['ms_per_token']:.1f} | {best['float32'] / (r['ms_per_token'] / 1e3):.2f}x |")
    return {"kind": "attention", "args": vars(args), "rows": rows}


def memory(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for dtype in args.kv_dtypes.split(","):
        llm = LLM(args.model, num_threads=args.threads, kv_dtype=dtype.strip(), kv_cache_memory_gb=args.kv_gb)
        info = llm.engine.kv_info()
        rows.append(info | {"kv_dtype": dtype, "seqs_8k": info["blocks"] * info["block_size"] // 8192})
        del llm
    print(f"\nKV memory with kv_cache_memory_gb={args.kv_gb}")
    print("| KV dtype | bytes/token | blocks | 8k-token sequences that fit |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['kv_dtype']} | {r['bytes_per_token']} | {r['blocks']} | {r['seqs_8k']} |")
    return {"kind": "memory", "args": vars(args), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("retrieval")
    r.add_argument("--suite", default="passkey", choices=["passkey", "needle"])
    r.add_argument("--lengths", default="1024,2048,4096,8192")
    r.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    r.add_argument("--n", type=int, default=1)
    r.add_argument("--policies", default="full,streaming,snapkv", help="comma list of full, streaming, snapkv, h2o, quest, "
                   "quest+pinF (Quest with the fraction F of its block budget pinned by the prompt's vote)")
    r.add_argument("--budget", default="0.25")
    r.add_argument("--kv-dtype", default="float32")
    r.add_argument("--batch", type=int, default=4)
    r.add_argument("--kv-gb", type=float, default=2.0,
                   help="KV cache size: room for every prompt lets later policies reuse the first one's prefill "
                        "through the prefix cache (full and quest share it; snapkv and streaming do not)")
    p = sub.add_parser("ppl")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--kv-dtypes", default="float32,int8")
    d = sub.add_parser("decode")
    d.add_argument("--context", default="4096", help="tokens of context, or a comma list (2048,4096,8192)")
    d.add_argument("--new", type=int, default=48)
    d.add_argument("--short", type=int, default=64,
                   help="also decode at this context per dtype: the step time without long-context attention "
                        "(0: skip the attention estimate)")
    d.add_argument("--policies", default="full,streaming,snapkv")
    d.add_argument("--budget", default="0.25")
    d.add_argument("--kv-dtypes", default="float32")
    a = sub.add_parser("attention")
    a.add_argument("--context", type=int, default=8192)
    a.add_argument("--layers", type=int, default=30)
    a.add_argument("--q-heads", type=int, default=9)
    a.add_argument("--kv-heads", type=int, default=3)
    a.add_argument("--head-dim", type=int, default=64)
    a.add_argument("--reps", type=int, default=5)
    m = sub.add_parser("memory")
    m.add_argument("--kv-dtypes", default="float32,int8")
    m.add_argument("--kv-gb", type=float, default=2.0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    result = {"retrieval": retrieval, "ppl": ppl, "decode": decode, "attention": attention,
              "memory": memory}[args.cmd](args)
    print(f"\n(wall {time.perf_counter() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
