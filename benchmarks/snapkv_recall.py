"""Which prompt rows does decode actually read, and does a SnapKV selection rule keep them?

For each retrieval item: one full-KV run (prefill + greedy answer), recording per layer the
observation window's queries (the last ``--window`` prompt tokens), the prompt's keys and the
queries of the first ``--steps`` decode steps. Then, for each selection rule, the rows SnapKV would
keep at ``--budget`` (per layer and kv head: the window's softmax votes summed over the window and
the GQA group, pooled, top-k plus the window) and two recalls over all layers and query heads:

- ``recall``: the share of the decode queries' attention (over the prompt) that falls on kept rows;
- ``key recall``: the same restricted to the answer's tokens in the prompt (every copy of the
  passkey / needle value): the rows the answer is copied from.

Rules: ``avgN`` / ``maxN`` (average / max pooling over N positions), ``none`` (no pooling).
The engine's rule is ``max`` with ``EngineConfig.kv_pool`` positions.

    python benchmarks/snapkv_recall.py --suite passkey --length 4096 --depths 0,0.5 --n 3 --seed 5

Instrumentation: the attention layer's ``_causal`` and ``ops.paged_decode_attention`` are wrapped
to read their arguments (the fused decode step is turned off so decode goes through the op).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

import llmopt.models.transformer as transformer
from llmopt import LLM, SamplingParams
from llmopt.config import KernelSettings
from llmopt.kernels.kv_select import observation_scores
from llmopt.tasks.longctx import ANSWER_TOKENS, RetrievalSuite


def pooled(scores: torch.Tensor, rule: str) -> torch.Tensor:
    if rule == "none":
        return scores
    kind, n = rule[:3], int(rule[3:])
    x = scores[:, None, :]
    if kind == "max":
        return F.max_pool1d(x, n, stride=1, padding=n // 2)[:, 0]
    return F.avg_pool1d(x, n, stride=1, padding=n // 2, count_include_pad=False)[:, 0]


def kept_mask(scores: torch.Tensor, keep: int, window: int, rule: str) -> torch.Tensor:
    """[Hk, C] votes -> bool [Hk, C]: the rule's top ``keep - window`` prefix rows plus the window."""
    C = scores.shape[1]
    prefix = C - window
    s = pooled(scores[:, :prefix], rule)
    top = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :keep - window]
    m = torch.zeros_like(scores, dtype=torch.bool)
    m.scatter_(1, top, True)
    m[:, prefix:] = True
    return m


class Recorder:
    """Window queries, prompt keys and decode queries of one request, per layer."""

    def __init__(self, num_layers: int, window: int):
        self.L, self.W = num_layers, window
        self.reset()

    def reset(self) -> None:
        self.win: list[torch.Tensor | None] = [None] * self.L
        self.keys: list[torch.Tensor | None] = [None] * self.L
        self.dec: list[list[torch.Tensor]] = [[] for _ in range(self.L)]
        self.calls = 0

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        prev = self.win[layer]
        both = q if prev is None else torch.cat([prev, q])
        self.win[layer] = both[-self.W:].clone()
        self.keys[layer] = k.clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--suite", default="passkey", choices=["passkey", "needle"])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--depths", default="0,0.5,1")
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rules", default="avg7,max7,none,max11,max15,max21,avg15")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rules = args.rules.split(",")

    llm = LLM(args.model, num_threads=args.threads, max_num_seqs=1, enable_prefix_caching=False,
              kernels=KernelSettings(fused_decode=False))
    tok = llm.tokenizer
    layers = [layer.self_attn for layer in llm.engine.runner.model.layers]
    rec = Recorder(len(layers), args.window)
    index = {id(a): i for i, a in enumerate(layers)}
    causal = transformer.Attention._causal
    decode_op = transformer.ops.paged_decode_attention

    def spy_causal(self, q, k, v, window):
        rec.prefill(index[id(self)], q, k)
        return causal(self, q, k, v, window)

    def spy_decode(q, *a, **kw):
        rec.dec[rec.calls % rec.L].append(q[0].clone())
        rec.calls += 1
        return decode_op(q, *a, **kw)

    transformer.Attention._causal = spy_causal  # type: ignore[method-assign,assignment]
    transformer.ops.paged_decode_attention = spy_decode
    scale = float(layers[0].scale)  # type: ignore[union-attr,arg-type]

    suite = RetrievalSuite(args.suite, tok, (args.length,), tuple(float(d) for d in args.depths.split(",")))
    totals: dict[str, list[tuple[float, float]]] = {r: [] for r in rules}
    for it in suite.items(args.n, args.seed):
        ids = tok.apply_chat_template(it.messages) + tok.encode(it.payload["answer_prefix"], add_special_tokens=False)
        answer = tok.encode(it.reference, add_special_tokens=False)
        at = [p + j for p in range(len(ids)) if ids[p:p + len(answer)] == answer for j in range(len(answer))]
        rec.reset()
        t0 = time.perf_counter()
        out = llm.generate([ids], SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0))[0]
        C = len(ids)
        keep = max(args.window, math.ceil(args.budget * C))
        line = [f"{it.id}: full KV answered {out.text!r} (key {it.reference}, {time.perf_counter() - t0:.0f} s)"]
        for rule in rules:
            mass = on_kept = key_mass = key_kept = 0.0
            for i in range(rec.L):
                q_win, keys = rec.win[i], rec.keys[i]
                assert q_win is not None and keys is not None
                keys = keys[:C].float()
                m = kept_mask(observation_scores(q_win, keys, scale), keep, args.window, rule)
                dq = torch.stack(rec.dec[i][:args.steps]).float()  # [T, Hq, D]
                G = dq.shape[1] // keys.shape[1]
                a = torch.einsum("thd,chd->thc", dq, keys.repeat_interleave(G, 1)).mul(scale).softmax(-1)
                mk = m.repeat_interleave(G, 0)[None].float()
                mass += float(a.sum())
                on_kept += float((a * mk).sum())
                key_mass += float(a[:, :, at].sum())
                key_kept += float((a * mk)[:, :, at].sum())
            r = (on_kept / mass, key_kept / key_mass if key_mass else float("nan"))
            totals[rule].append(r)
            line.append(f"  {rule:6s} recall {r[0]:.3f}  key recall {r[1]:.3f}")
        print("\n".join(line), flush=True)
    print(f"\n{args.suite} at {args.length} tokens, depths {args.depths}, n={args.n} per depth, seed {args.seed}, "
          f"budget {args.budget}, window {args.window}, first {args.steps} decode steps")
    print("| rule | recall (mean over items) | key recall (mean over items) |")
    print("|---|---|---|")
    for rule, rs in totals.items():
        print(f"| {rule} | {sum(r[0] for r in rs) / len(rs):.3f} | {sum(r[1] for r in rs) / len(rs):.3f} |")


if __name__ == "__main__":
    main()
