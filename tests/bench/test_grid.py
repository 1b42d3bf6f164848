"""``llmopt bench``: a tiny grid end to end (structure and greedy-token agreement, never speed)."""

import json
import sys

import pytest
from typer.testing import CliRunner

from llmopt.bench.baselines import left_pad
from llmopt.bench.grid import Cell, parse_int_list, percentile, product_cells, random_prompts
from llmopt.cli import app

SYSTEM_KEYS = {"output_tokens_per_s", "stream_decode_tokens_per_s", "ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms",
               "tpot_p90_ms", "peak_rss_mb", "peak_rss_scope", "wall_s", "output_tokens",
               "cpu_ms_per_output_token", "prefill_tokens_per_s"}
RATIO_KEYS = {"output_tokens_per_s_x", "stream_decode_tokens_per_s_x", "ttft_p50_speedup_x", "tpot_p50_speedup_x",
              "cpu_per_token_speedup_x", "peak_rss_x", "prefill_tokens_per_s_x"}


def test_bench_cli_writes_both_systems_and_they_agree_on_greedy_tokens(tiny_models, tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", str(tiny_models["llama"][1]), "--concurrency", "1,3",
                                   "--input-len", "7", "--output-len", "5", "--threads", "1", "--repeat", "2",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["kind"] == "llmopt-bench"
    assert {"cpu_model", "threads", "torch", "git"} <= set(data["machine"]) and data["machine"]["threads"] == 1
    from llmopt.kernels import gguf_linear

    kern = data["machine"]["kernels"]  # which kernel build ran, and with which prefetch table
    assert kern["gguf_path"] == gguf_linear.cpu_path() and kern["prefetch"] in ("measured", "default")
    assert f"GGUF kernels {kern['gguf_path']}" in res.output
    assert kern["prompt_bf16x3"] == gguf_linear.bf16x3_available()  # (LLMOPT_GGUF_BF16X3 unset in tests)
    assert ("prompt rows on AMX-BF16" in " ".join(res.output.split())) == kern["prompt_bf16x3"]  # (title wraps)
    int16 = not kern["prompt_bf16x3"] and gguf_linear.int16_fast()  # by-kind's prompt rows where VNNI makes it faster
    assert kern["prompt_int16"] is int16 and ("prompt rows int16" in " ".join(res.output.split())) == int16
    assert [(c["concurrency"], c["input_len"], c["output_len"]) for c in data["cells"]] == [(1, 7, 5), (3, 7, 5)]
    for cell in data["cells"]:
        assert cell["reference"] == "transformers"
        assert set(cell["systems"]) == {"llmopt", "transformers"}
        for m in cell["systems"].values():
            assert SYSTEM_KEYS <= set(m)
            assert m["output_tokens"] == cell["concurrency"] * 5
            assert len(m["output_tokens_per_s_runs"]) == 2 and m["peak_rss_mb"] > 0
        assert set(cell["ratios"]["llmopt"]) == RATIO_KEYS
        match = cell["greedy_tokens_vs_reference"]["llmopt"]
        assert match["requests"] == 2 * cell["concurrency"] and match["all_identical"], match
        assert cell["systems"]["llmopt"]["prefix_cache_hit_tokens"] == 0  # fresh prompts every run
    assert {(r["concurrency"], r["backend"]) for r in data["rows"]} == {(c, s) for c in (1, 3)
                                                                         for s in ("llmopt", "transformers")}
    assert "┏" in res.output and f"wrote {out}" in res.output  # the rich table, then the file
    # every row says which weights its speed was measured on: bits per weight and held-out perplexity,
    # scored by each system on the same token ids (the same fp32 weights here: the same perplexity)
    q = data["quality"]
    assert set(q) == {"llmopt", "transformers"}
    assert q["llmopt"]["heldout_tokens"] == q["transformers"]["heldout_tokens"] > 1000
    assert q["llmopt"]["bits_per_weight"] == q["transformers"]["bits_per_weight"] == 32.0
    assert abs(q["llmopt"]["heldout_ppl"] / q["transformers"]["heldout_ppl"] - 1) < 1e-4, q
    assert all(r["heldout_ppl"] == q[r["backend"]]["heldout_ppl"] for r in data["rows"])
    assert "held-out ppl" in res.output


def test_bench_quality_scores_a_gguf_file_on_its_own_blocks(tiny_models, tmp_path):
    """On a quantized GGUF, llmopt's bits per weight are the file's blocks, transformers' the fp32 it
    dequantizes to, and both score the same weights (the same perplexity: by-kind prompt rows are fp32)."""
    from llmopt.bench.grid import markdown_table

    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", str(tiny_models["llama"][2]), "--concurrency", "1", "--input-len", "5",
                                   "--output-len", "2", "--threads", "1", "--no-warmup", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    q = data["quality"]
    assert q["transformers"]["bits_per_weight"] == 32.0
    assert abs(q["llmopt"]["heldout_ppl"] / q["transformers"]["heldout_ppl"] - 1) < 1e-3, q
    assert "held-out ppl" in markdown_table(data)
    res = CliRunner().invoke(app, ["bench", str(tiny_models["llama"][2]), "--concurrency", "1", "--input-len", "5",
                                   "--output-len", "2", "--threads", "1", "--no-warmup", "--no-quality",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["quality"] == {} and all(r["heldout_ppl"] is None for r in data["rows"])


def test_bench_rejects_bad_grid_values_with_a_clear_message():
    with pytest.raises(ValueError, match="--concurrency"):
        parse_int_list("1,x", "--concurrency")
    with pytest.raises(ValueError, match="--output-len"):
        parse_int_list("0", "--output-len")
    res = CliRunner().invoke(app, ["bench", "--baseline", "vllm", "--concurrency", "1"])
    assert res.exit_code != 0 and "baseline" in res.output


def test_bench_quant_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "llmopt.quant.linear", None)  # as if it did not import
    res = CliRunner().invoke(app, ["bench", "--quant", "int4"])
    assert res.exit_code != 0 and "llmopt.quant.linear" in res.output


def test_grid_helpers():
    assert product_cells([1, 4], [8], [2, 3]) == [Cell(1, 8, 2), Cell(4, 8, 2), Cell(1, 8, 3), Cell(4, 8, 3)]
    p = random_prompts(3, 11, 50, seed=1)
    assert p == random_prompts(3, 11, 50, seed=1) and all(len(x) == 11 and max(x) < 50 for x in p)
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5 and percentile([], 90) is None
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_prefill_tokens_per_s_is_prompt_tokens_over_time_to_the_last_first_token():
    from llmopt.bench.grid import RunTrace, summarize

    # two requests of 10 prompt tokens arrive at t0 = 0; their first tokens come at 0.5 s and 1.0 s
    trace = RunTrace(t0=0.0, t_end=2.0, token_ids=[[1, 2], [3, 4]], token_times=[[0.5, 1.5], [1.0, 2.0]],
                     peak_rss_bytes=2**20, peak_rss_scope="run")
    m = summarize([trace], Cell(2, 10, 2))
    assert m["prefill_tokens_per_s"] == 20.0 and m["output_tokens_per_s"] == 2.0
    assert m["ttft_p50_ms"] == 750.0 and m["tpot_p50_ms"] == 1000.0


def test_peers_are_validated_and_a_missing_llama_cpp_is_skipped_with_a_message(tiny_models, tmp_path, monkeypatch):
    from llmopt.bench.grid import GridConfig, peer_problems

    with pytest.raises(ValueError, match="unknown --peer 'vllm'"):
        GridConfig(peers=["vllm"])
    assert GridConfig(peers=["llamacpp"], baseline="none").systems == ["llmopt", "llama.cpp"]
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    assert "pip install 'llmopt[llamacpp]'" in peer_problems(["llamacpp"], str(tiny_models["llama"][2]))["llama.cpp"]
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", str(tiny_models["llama"][1]), "--concurrency", "1", "--input-len", "4",
                                   "--output-len", "2", "--threads", "1", "--baseline", "none", "--no-warmup",
                                   "--peer", "llamacpp", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "skipping llama.cpp" in res.output and "not installed" in res.output
    data = json.loads(out.read_text())
    assert list(data["cells"][0]["systems"]) == ["llmopt"] and "llama.cpp" in data["settings"]["skipped"]


def test_bench_kv_dtype_rows_score_their_quality_through_the_cache(tiny_models, tmp_path):
    """``--kv-dtype float16``: the llmopt row runs a float16 KV cache and its held-out perplexity is scored
    through that cache (close to transformers' on the same fp32 weights, not equal); a bad type is refused
    before anything loads."""
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", str(tiny_models["llama"][1]), "--concurrency", "2", "--input-len", "7",
                                   "--output-len", "3", "--threads", "1", "--no-warmup", "--kv-dtype", "float16",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["settings"]["systems"]["llmopt"]["kv_dtype"] == "float16"
    assert data["settings"]["systems"]["llmopt"]["engine_config"]["kv_dtype"] == "float16"
    q = data["quality"]
    ratio = q["llmopt"]["heldout_ppl"] / q["transformers"]["heldout_ppl"]
    assert ratio != 1.0 and abs(ratio - 1) < 1e-2, q
    res = CliRunner().invoke(app, ["bench", str(tiny_models["llama"][1]), "--kv-dtype", "int4", "--concurrency", "1"])
    assert res.exit_code != 0 and "kv_dtype must be one of" in res.output
