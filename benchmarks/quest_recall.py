"""How much attention mass Quest's block choice keeps, per block-score rule, on retrieval prompts.

    python benchmarks/quest_recall.py --lengths 2048,4096 --n 1 --steps 3 --radius 1,0.5,0.25,0

Runs each passkey and needle item (depths 0, 0.5, 1) with dense attention (an engine built with
kv_policy 'quest' and every layer dense: the same kernel, reading every block) and records, at its
first ``--steps`` decode steps and in every layer from ``--dense-layers`` on, the queries and the
per-block key min / max summaries. For each radius weight a, a block scores
max over the group's query heads of sum_d (q_d c_d + a |q_d| r_d) (c, r: the block's centre and
radius; a = 1 is Quest's upper bound, the engine uses ``quest.RADIUS``), and the budget's blocks are
chosen as the kernel does (the first, the last and the best k - 2 others). Printed per rule: the
dense attention mass inside the chosen blocks, averaged over layers, kv heads, query heads and
steps; and the same for the key's tokens only, over the (query head, layer, step) cases that put
more than 0.1 of their mass on the key (the heads that copy it).
"""

from __future__ import annotations

import argparse
import math

import torch

from llmopt import LLM, SamplingParams
from llmopt.kernels import quest
from llmopt.tasks.longctx import RetrievalSuite


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--radius", default="1,0.5,0.25,0")
    ap.add_argument("--dense-layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    radii = [float(x) for x in args.radius.split(",")]
    # every layer dense: attention reads every block (dense bits) and still passes q and the summaries
    llm = LLM(args.model, num_threads=args.threads, kv_policy="quest", kv_budget=args.budget, max_num_seqs=1,
              kv_quest_dense_layers=1_000_000)
    llm.engine.runner.fused = None  # the op-by-op forward, whose attention call is recorded below
    tok = llm.tokenizer
    num_layers = llm.engine.model.cfg.num_layers
    real = quest.quest_decode_attention
    calls: list[tuple[torch.Tensor, ...]] = []

    def recording(q, kc, vc, ks, vs, kmin, kmax, tables, lens, topk, scale):  # type: ignore[no-untyped-def]
        calls.append((q.clone(), kc, kmin.clone(), kmax.clone(), tables.clone(), lens.clone(), scale))
        return real(q, kc, vc, ks, vs, kmin, kmax, tables, lens, topk, scale)

    quest.quest_decode_attention = recording  # type: ignore[assignment]
    bs = llm.engine.runner.block_size
    sums = {a: [0.0, 0, 0.0, 0] for a in radii}
    lengths = tuple(int(x) for x in args.lengths.split(","))
    for suite in ("passkey", "needle"):
        for it in RetrievalSuite(suite, tok, lengths, (0.0, 0.5, 1.0)).items(args.n, args.seed):
            prompt = tok.apply_chat_template(it.messages) + tok.encode(it.payload["answer_prefix"],
                                                                       add_special_tokens=False)
            calls.clear()
            llm.generate([prompt], SamplingParams(max_tokens=args.steps + 1, temperature=0.0, kv_policy="quest",
                                                  kv_budget=args.budget))
            key = [tok.encode(c, add_special_tokens=False)[0] for c in it.reference]
            starts = [i for i in range(len(prompt) - len(key)) if prompt[i:i + len(key)] == key]
            key_tokens = torch.tensor(sorted({p + j for p in starts for j in range(len(key))}))
            for i, call in enumerate(calls):  # calls[step * num_layers + layer]
                if i % num_layers < args.dense_layers:
                    continue
                q, kc, kmin, kmax, tables, lens, scale = call
                ctx = int(lens[0])
                nb = -(-ctx // bs)
                k = -(-math.ceil(args.budget * ctx) // bs)
                hk, d = kmin.shape[1], q.shape[2]
                g = q.shape[1] // hk
                blocks = tables[0, :nb].long()
                t = torch.arange(ctx)
                qs = q[0].reshape(hk, g, d) * scale
                probs = torch.einsum("hgd,thd->hgt", qs, kc[blocks[t // bs], t % bs]).softmax(-1)
                mass = torch.zeros(hk, g, nb).index_add_(2, t // bs, probs)
                key_mass = probs[:, :, key_tokens].sum(-1)
                for a in radii:  # the engine's selection rule (quest_select_ref) with radius weight a
                    chosen = quest.quest_select_ref(q, kmin, kmax, tables, lens, torch.tensor([k]), bs, scale,
                                                    radius=a)[0, :, :nb]
                    kept = (mass * chosen[:, None, :]).sum(-1)
                    key_kept = (probs[:, :, key_tokens] * chosen[:, key_tokens // bs][:, None, :]).sum(-1)
                    hot = key_mass > 0.1
                    s = sums[a]
                    s[0] += float(kept.sum())
                    s[1] += kept.numel()
                    s[2] += float((key_kept[hot] / key_mass[hot]).sum())
                    s[3] += int(hot.sum())
            print(f"  {it.id} done", flush=True)
    print(f"\nQuest block choice at budget {args.budget}: lengths {args.lengths}, n={args.n} per (suite, length, depth), "
          f"seed {args.seed}, first {args.steps} decode steps, layers from {args.dense_layers}")
    print("| radius weight | attention mass kept (all heads) | key mass kept (heads with key mass > 0.1) | cases |")
    print("|---|---|---|---|")
    for a, s in sums.items():
        print(f"| {a:g}{' (Quest bound)' if a == 1 else ''} | {s[0] / s[1]:.4f} | {s[2] / max(1, s[3]):.4f} | {s[3]} |")


if __name__ == "__main__":
    main()
