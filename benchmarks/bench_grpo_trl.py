"""GRPO side by side: ``llmopt train grpo`` (rollouts through our engine) against TRL's
``GRPOTrainer`` on the same model, data, reward and settings, a few steps each, one process.

Both runs:
- the same weights (the model's checkpoint dequantized to fp32; TRL gets it as a transformers
  model built by ``llmopt.models.loader.load_transformers_model``) and the same tokenizer;
- the same training questions in the same order (``llmopt.train.data``, training seeds), each
  under the competition's system prompt;
- the same reward (``llmopt.train.rewards.reward``: 0.5 x format + 1.0 x correct);
- G rollouts per question, the same number of questions per step, the same ``max_new_tokens``,
  temperature 1.0, top-p 1.0, LoRA rank/alpha on the same layers, AdamW at the same learning
  rate, KL weight beta to the base model;
- the same torch thread count.

Printed per system: mean step time, rollout (generation) time per step, completion tokens per
step, and rollout tokens/s = completion tokens / rollout time, in wall time and in process CPU
time (on a shared machine the CPU-time figure is the one other processes disturb least). TRL's
generation time is measured around its ``generate`` call (wrapped on the model instance), ours
around ``GRPOTrainer.rollouts``; step times by a trainer callback (TRL) and the run log (ours).
Step 1 of each run is reported apart (warm-up) and left out of the means.

    python benchmarks/bench_grpo_trl.py --steps 4 --prompts-per-step 2 --group-size 4 --max-new-tokens 96
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's llmopt, not an installed one


def _examples(n: int):
    from llmopt.tasks.base import interleave
    from llmopt.train.data import reasoning_gym_examples

    half = max(1, n // 2)
    # math and logic in turn, like the trainer's round-robin
    return interleave([reasoning_gym_examples("math", half, chunk=7),
                       reasoning_gym_examples("logic", n - half, chunk=7)], n)


def run_ours(args, examples) -> dict:
    from llmopt.train.common import LoraSpec
    from llmopt.train.grpo import GRPOConfig, GRPOTrainer

    with tempfile.TemporaryDirectory() as d:
        cfg = GRPOConfig(model=args.model, out=d, suites="math=1,logic=1", systems="reasoning",
                         steps=args.steps, prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                         max_new_tokens=args.max_new_tokens, temperature=1.0, lr=args.lr, beta=args.beta,
                         save_every=10_000, seed=args.seed,
                         lora=LoraSpec(rank=args.lora_rank, alpha=2.0 * args.lora_rank,
                                       first_layer=args.lora_first_layer),
                         num_threads=args.threads)
        cfg.validate()
        trainer = GRPOTrainer(cfg)
        trainer.examples = examples  # the same questions, in the same order, as TRL's run
        cpu_s: list[float] = []
        rollouts = trainer.rollouts

        def timed_rollouts(step):
            c0 = time.process_time()
            try:
                return rollouts(step)
            finally:
                cpu_s.append(time.process_time() - c0)

        trainer.rollouts = timed_rollouts  # type: ignore[method-assign]
        trainer.train()
        recs = [json.loads(line) for line in (Path(d) / "log.jsonl").read_text().splitlines() if line.strip()]
    return {"step_s": [r["step_s"] for r in recs], "rollout_s": [r["rollout_s"] for r in recs],
            "rollout_cpu_s": cpu_s[: len(recs)], "tokens": [r["rollout_tokens"] for r in recs]}


def run_trl(args, examples) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from llmopt.models.loader import load_transformers_model, open_checkpoint
    from llmopt.tasks.base import REASONING_SYSTEM_PROMPT
    from llmopt.train.rewards import reward

    torch.set_num_threads(args.threads)
    _cfg, tok, _w, _p = open_checkpoint(args.model)
    hf_tok = tok.hf
    if hf_tok.pad_token is None:
        hf_tok.pad_token = hf_tok.eos_token
    model = load_transformers_model(args.model)
    n_layers = model.config.num_hidden_layers
    rows = [{"prompt": [{"role": "system", "content": REASONING_SYSTEM_PROMPT},
                        {"role": "user", "content": ex.question}], "idx": i} for i, ex in enumerate(examples)]
    ds = Dataset.from_list(rows)
    n_tokens: list[int] = []

    def reward_fn(completions, idx, **_kw):
        out = []
        for comp, i in zip(completions, idx):
            text = comp[0]["content"] if isinstance(comp, list) else comp
            k = len(hf_tok.encode(text, add_special_tokens=False))
            n_tokens.append(k)
            out.append(reward(text, examples[i].grade, k, args.max_new_tokens).total)
        return out

    gen_s: list[float] = []
    gen_cpu_s: list[float] = []

    def timed_generate(*a, **kw):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return orig_generate(*a, **kw)
        finally:
            gen_s.append(time.perf_counter() - t0)
            gen_cpu_s.append(time.process_time() - c0)

    step_s: list[float] = []

    class StepTimer(TrainerCallback):
        t0 = 0.0

        def on_step_begin(self, *_a, **_k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_a, **_k):
            step_s.append(time.perf_counter() - self.t0)

    G = args.group_size
    with tempfile.TemporaryDirectory() as d:
        conf = GRPOConfig(output_dir=d, per_device_train_batch_size=args.prompts_per_step * G,
                          gradient_accumulation_steps=1, num_generations=G, max_completion_length=args.max_new_tokens,
                          temperature=1.0, top_p=1.0, learning_rate=args.lr, beta=args.beta, max_steps=args.steps,
                          logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                          seed=args.seed, shuffle_dataset=False, dataloader_num_workers=0)
        lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                          layers_to_transform=list(range(args.lora_first_layer, n_layers)), task_type="CAUSAL_LM")
        trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=conf, train_dataset=ds,
                              processing_class=hf_tok, peft_config=lora, callbacks=[StepTimer()])
        # PEFT wraps the model: time the generate of the object TRL calls
        inner = trainer.model
        orig_generate = inner.generate
        inner.generate = timed_generate
        trainer.train()
    per_step = max(1, len(n_tokens) // max(1, len(step_s)))
    tokens = [sum(n_tokens[i * per_step:(i + 1) * per_step]) for i in range(len(step_s))]
    return {"step_s": step_s, "rollout_s": gen_s[: len(step_s)], "rollout_cpu_s": gen_cpu_s[: len(step_s)],
            "tokens": tokens}


def _summary(name: str, r: dict) -> tuple[float, float, float]:
    steps = list(zip(r["step_s"], r["rollout_s"], r["rollout_cpu_s"], r["tokens"]))
    first, rest = steps[0], steps[1:] or steps
    step = statistics.fmean(s[0] for s in rest)
    gen = statistics.fmean(s[1] for s in rest)
    tok = statistics.fmean(s[3] for s in rest)
    tps = sum(s[3] for s in rest) / sum(s[1] for s in rest)
    cpu_tps = sum(s[3] for s in rest) / sum(s[2] for s in rest)
    print(f"{name:8} {len(steps):>5} {first[0]:9.1f} {step:9.1f} {gen:11.1f} {tok:10.0f} {tps:14.1f} {cpu_tps:18.1f}")
    return step, tps, cpu_tps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-first-layer", type=int, default=18)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["ours", "trl"], help="run one side only")
    args = ap.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("this benchmark needs TRL: pip install trl datasets (it is not an llmopt dependency)") from None
    examples = _examples(args.steps * args.prompts_per_step)
    res = {}
    if args.only != "trl":
        res["llmopt"] = run_ours(args, examples)
    if args.only != "ours":
        res["trl"] = run_trl(args, examples)
    print(f"\nGRPO, {args.model}, {args.steps} steps x {args.prompts_per_step} prompts x G={args.group_size}, "
          f"max_new_tokens {args.max_new_tokens}, {args.threads} threads (means over steps 2..)")
    print(f"{'system':8} {'steps':>5} {'step1 s':>9} {'step s':>9} {'rollout s':>11} {'tokens':>10} "
          f"{'rollout tok/s':>14} {'rollout tok/cpu-s':>18}")
    out = {name: _summary(name, r) for name, r in res.items()}
    if len(out) == 2:
        (s_ours, t_ours, c_ours), (s_trl, t_trl, c_trl) = out["llmopt"], out["trl"]
        print(f"\nllmopt / TRL: rollout tok/s {t_ours / t_trl:.2f}x (per CPU second {c_ours / c_trl:.2f}x), "
              f"step time {s_trl / s_ours:.2f}x faster")


if __name__ == "__main__":
    main()
