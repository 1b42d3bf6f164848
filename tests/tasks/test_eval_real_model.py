"""End to end on the real embedded model: the harness records exactly what the model says."""

import json

import pytest

from llmopt import SamplingParams
from llmopt.reasoning.format import extract_answer
from llmopt.tasks.evaluate import EvalConfig, build_items, run_eval


@pytest.mark.slow
def test_run_eval_records_the_models_own_greedy_outputs(real_llm):
    config = EvalConfig(suites=("math", "format", "ppl"), n=1, seed=0, max_tokens=4,
                        ppl_max_tokens=16, batch_size=1)
    run = run_eval(real_llm, config, command="pytest")
    json.dumps(run)  # the whole run is JSON-serializable
    items = build_items(config)
    direct = real_llm.chat([items["math"][0].messages], SamplingParams(max_tokens=4, temperature=0.0))[0]
    math_rec, fmt_rec, ppl_rec = run["items"]
    assert math_rec["output"] == direct.text and math_rec["tokens"] == len(direct.token_ids) > 0
    assert math_rec["answer"] == extract_answer(direct.text)
    # the format suite's first item is that same math prompt, generated once and reused
    assert fmt_rec["output"] == direct.text and fmt_rec["cached"] is True
    assert run["generation"]["requests"] == 1
    assert ppl_rec["tokens"] == 15 and ppl_rec["nll"] > 0
    assert run["suites"]["math"]["n"] == 1 and run["suites"]["ppl"]["n"] == 1
    assert run["suites"]["math"]["accuracy"] == float(math_rec["correct"])
    assert math_rec["latency_s"] > 0
