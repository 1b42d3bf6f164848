"""llama.cpp as a bench peer (skipped unless ``pip install 'llmopt[llamacpp]'``): the trace follows
the bench method, and batched decoding gives every sequence the tokens it gets alone."""

import json

import pytest

pytest.importorskip("llama_cpp")

from typer.testing import CliRunner

from llmopt.bench.grid import random_prompts
from llmopt.bench.llamacpp import LlamaCppSystem, resolve_gguf
from llmopt.cli import app
from llmopt.config import EngineConfig
from tests.conftest import SMOLLM2, requires_smollm2

pytestmark = requires_smollm2


@pytest.fixture(scope="module")
def system():
    s = LlamaCppSystem(SMOLLM2, threads=1, max_seq_len=210)
    yield s
    s.close()


def _check_trace(result, n, input_len, output_len, vocab):
    t0, t_end, ids, times, extra = result
    assert len(ids) == len(times) == n
    for seq_ids, seq_times in zip(ids, times):
        assert len(seq_ids) == len(seq_times) == output_len  # EOS never stops a sequence
        assert all(0 <= t < vocab for t in seq_ids)
        assert t0 < seq_times[0] and seq_times == sorted(seq_times) and seq_times[-1] <= t_end
    return ids


def test_registry_name_resolves_to_the_gguf_file_and_other_models_are_refused(system, tiny_models):
    assert resolve_gguf(SMOLLM2).suffix == ".gguf" and system.info["gguf"].endswith(".gguf")
    with pytest.raises(ValueError, match="GGUF files only"):
        resolve_gguf(str(tiny_models["llama"][1]))  # a Hugging Face directory


def test_single_stream_trace_is_greedy_and_deterministic(system):
    [prompt] = random_prompts(1, 8, system.vocab_size, seed=3)
    first = _check_trace(system.run([prompt], 4), 1, 8, 4, system.vocab_size)
    assert _check_trace(system.run([prompt], 4), 1, 8, 4, system.vocab_size) == first


def test_batched_sequences_get_the_tokens_they_get_alone(system):
    prompts = random_prompts(2, 8, system.vocab_size, seed=7)
    result = system.run(prompts, 4)
    batched = _check_trace(result, 2, 8, 4, system.vocab_size)
    assert result[3][0][1:] == result[3][1][1:]  # one llama_decode per step: the sequences share its timestamps
    assert result[4]["llama_decode_calls"] == 1 + 3
    alone = [system.run([p], 4)[2][0] for p in prompts]
    assert batched == alone
    assert batched[0] != batched[1]  # different prompts: the sequences did not bleed into each other


def test_chunked_prefill_of_mixed_lengths_matches_too(system):
    small = LlamaCppSystem(SMOLLM2, threads=1, max_seq_len=64, n_batch=8)  # prompts span several llama_decode calls
    try:
        prompts = [random_prompts(1, n, system.vocab_size, seed=n)[0] for n in (13, 5, 11)]
        result = small.run(prompts, 3)
        # continuous batching: 29 prompt tokens plus the started sequences' decodes, 8 per llama_decode
        assert result[4]["llama_decode_calls"] == 6
        times = result[3]
        assert times[0][1] <= times[2][0]  # the first sequence decodes while the last one still prefills
        assert result[2] == [system.run([p], 3)[2][0] for p in prompts]
    finally:
        small.close()


def test_peer_runs_with_llama_cpp_defaults_and_refuses_bad_settings(system):
    assert system.info["flash_attn"] == "auto" and system.info["n_ubatch"] == 512
    assert system.info["n_batch"] == EngineConfig().max_num_batched_tokens  # our token budget per step
    with pytest.raises(ValueError, match="flash_attn"):
        LlamaCppSystem(SMOLLM2, threads=1, flash_attn="sometimes")


def test_prefill_batches_are_not_capped_by_one_sequence_context(system):
    # 2 x 200 prompt tokens go in one 512-token llama_decode although each sequence has only 256 KV cells
    prompts = random_prompts(2, 200, system.vocab_size, seed=11)
    result = system.run(prompts, 2)
    assert result[4]["llama_decode_calls"] == 1 + 1
    assert result[2] == [system.run([p], 2)[2][0] for p in prompts]


def test_bench_runs_llama_cpp_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", SMOLLM2, "--concurrency", "1,2", "--input-len", "8", "--output-len", "4",
                                   "--threads", "1", "--baseline", "none", "--peer", "llamacpp", "--markdown",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["settings"]["skipped"] == {}
    for cell in data["cells"]:
        peer = cell["systems"]["llama.cpp"]
        assert peer["output_tokens"] == cell["concurrency"] * 4 and peer["prefill_tokens_per_s"] > 0
        assert cell["greedy_tokens_vs_reference"]["llama.cpp"]["comparable"] is False
        assert cell["ratios"]["llama.cpp"]["output_tokens_per_s_x"] > 0
        # its own process never imports torch: far below llmopt's fp32 process
        assert peer["peak_rss_mb"] < cell["systems"]["llmopt"]["peak_rss_mb"]
    assert "| llama.cpp |" in res.output and "n/a" in res.output
    # the same file's blocks on both sides; llama.cpp's 8-bit activations cost it a little perplexity
    q = data["quality"]
    assert q["llama.cpp"]["bits_per_weight"] == q["llmopt"]["bits_per_weight"]
    assert q["llama.cpp"]["heldout_tokens"] == q["llmopt"]["heldout_tokens"] > 1000
    assert abs(q["llama.cpp"]["heldout_ppl"] / q["llmopt"]["heldout_ppl"] - 1) < 0.02, q
