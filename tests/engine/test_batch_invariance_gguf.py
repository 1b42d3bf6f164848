"""A sequence of a GGUF-native model gets the same logits, bit for bit, alone and inside a mixed
prefill + decode batch, in every activation mode: its prompt chunked differently (token budget),
its decode rows sharing steps with a neighbour's prefill (the op-by-op forward, not the fused step)."""

from __future__ import annotations

import gguf
import pytest
import torch

from llmopt.config import EngineConfig, KernelSettings
from llmopt.engine.engine import LLMEngine
from llmopt.engine.sampling_params import SamplingParams
from llmopt.kernels import gguf_linear as G
from tests.conftest import gguf_blocks, tiny_hf_model, write_gguf

QT = gguf.GGMLQuantizationType
ACTS = ["fp32", "int8", "by-kind"]


@pytest.fixture(scope="module")
def q4_1_file(tmp_path_factory):
    """Q4_1 layers and a Q8_0 tied head (the default model's types), in_features multiples of 32."""
    model = tiny_hf_model("qwen2", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32, num_hidden_layers=2)
    path = tmp_path_factory.mktemp("gguf") / "tiny-q4_1.gguf"
    return write_gguf(model, path, qtype=lambda name: QT.Q8_0 if name == "token_embd.weight" else QT.Q4_1,
                      quantizer=gguf_blocks)


def _engine(path, act: str, budget: int) -> LLMEngine:
    cfg = EngineConfig(num_threads=1, num_kv_blocks=64, block_size=16, max_num_batched_tokens=budget,
                       kernels=KernelSettings(gguf_act=act))
    return LLMEngine(str(path), cfg)


def _record(eng: LLMEngine, watch: str) -> tuple[dict[str, list[torch.Tensor]], list[bool]]:
    """From now on, every request's logits (one per sampled token) by request id, and per step that
    ``watch`` takes part in, whether the step also had rows of another sequence's prefill."""
    logits: dict[str, list[torch.Tensor]] = {}
    mixed: list[bool] = []
    execute = eng.runner.execute

    def recording(batch):
        seqs, out = execute(batch)
        if any(s.request_id == watch for s, _ in batch):
            mixed.append(any(n > 1 and s.request_id != watch for s, n in batch))
        for i, s in enumerate(seqs):
            logits.setdefault(s.request_id, []).append(out[i].clone())
        return seqs, out

    eng.runner.execute = recording  # type: ignore[method-assign]
    return logits, mixed


def _run(eng: LLMEngine, requests: list[tuple[int, list[int], int]], watch: str):
    """Add request ``(arrival step, prompt ids, max tokens)`` i as ``r{i}`` at its step and step to the
    end. Returns ``watch``'s logits and the mixed-step flags of :func:`_record`."""
    logits, mixed = _record(eng, watch)
    step = 0
    pending = sorted(enumerate(requests), key=lambda r: r[1][0])
    while pending or eng.has_unfinished():
        while pending and pending[0][1][0] <= step:
            i, (_, ids, n) = pending.pop(0)
            eng.add_request(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), request_id=f"r{i}")
        eng.step()
        step += 1
    return logits[watch], mixed


@pytest.mark.skipif(G.kernel_table() is None, reason="native GGUF kernels unavailable")
@pytest.mark.parametrize("act", ACTS)
def test_logits_alone_equal_logits_in_a_mixed_prefill_decode_batch(q4_1_file, act):
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 200, (33,), generator=g).tolist()
    other = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (50, 45)]
    # alone: the prompt in chunks of 16, 16, 1 (a one-row step of a prompt token); batched: 14, then 19
    # next to a neighbour's decode row, then its decode rows next to a second neighbour's prefill
    alone, _ = _run(_engine(q4_1_file, act, budget=16), [(0, prompt, 10)], "r0")
    together, mixed = _run(_engine(q4_1_file, act, budget=64),
                           [(0, other[0], 6), (1, prompt, 10), (5, other[1], 4)], "r1")
    assert len(alone) == len(together) == 10
    assert any(mixed), "the batch never mixed the sequence's rows with another prefill"
    for i, (a, b) in enumerate(zip(alone, together)):
        assert torch.equal(a, b), f"token {i}: max |diff| {(a - b).abs().max().item():.3g}"


@pytest.mark.skipif(G.kernel_table() is None, reason="native GGUF kernels unavailable")
@pytest.mark.parametrize("act", ["int8", "by-kind"])
def test_greedy_under_preemption_equals_single(q4_1_file, act):
    """Preempted sequences recompute their prompt and generated tokens in prefill chunks: each token
    keeps its kind's precision there (by-kind: generated tokens int8 as when they were decoded), so
    every logit equals that of the sequences run one at a time."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 200, (int(torch.randint(3, 60, (1,), generator=g)),), generator=g).tolist()
               for _ in range(8)]
    sp = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    ks = KernelSettings(gguf_act=act)
    single = LLMEngine(str(q4_1_file), EngineConfig(num_threads=1, num_kv_blocks=64, block_size=8, max_num_seqs=1,
                                                    kernels=ks))
    want, _ = _record(single, "")
    for i, p in enumerate(prompts):
        single.add_request(p, sp, request_id=f"r{i}")
        while single.has_unfinished():
            single.step()
    tight = LLMEngine(str(q4_1_file), EngineConfig(num_threads=1, num_kv_blocks=14, block_size=8, kernels=ks))
    got, _ = _record(tight, "")
    for i, p in enumerate(prompts):
        tight.add_request(p, sp, request_id=f"r{i}")
    while tight.has_unfinished():
        tight.step()
    assert tight.scheduler.num_preemptions > 0
    for r in want:
        assert len(got[r]) == len(want[r]) == 20
        assert all(torch.equal(a, b) for a, b in zip(got[r], want[r])), f"{r}: logits differ after preemption"


@pytest.mark.skipif(G.kernel_table() is None, reason="native GGUF kernels unavailable")
def test_logits_alone_equal_logits_in_a_batch_with_fewer_kv_heads_than_threads(tmp_path):
    """One kv head at 2 threads: a row alone is fewer attention items than threads, so rows past 256
    tokens split their tokens (flash-decoding). The chunks follow the row's own context, never the batch
    (fused_kernels.h token_chunks), so decode rows at 521-540 tokens get the same logits alone (split in
    halves because it was alone, under the old rule: threads / items) and beside a neighbour, in the
    fused decode step and in mixed prefill + decode steps."""
    model = tiny_hf_model("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                          num_key_value_heads=1, head_dim=16, num_hidden_layers=2)
    path = write_gguf(model, tmp_path / "tiny-hk1.gguf", qtype=lambda name: QT.Q4_1, quantizer=gguf_blocks)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 200, (520,), generator=g).tolist()
    other = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (270, 40)]

    def engine(budget: int) -> LLMEngine:
        return LLMEngine(str(path), EngineConfig(num_threads=2, num_kv_blocks=96, block_size=16,
                                                 max_num_batched_tokens=budget))

    alone, _ = _run(engine(128), [(0, prompt, 20)], "r0")
    together, mixed = _run(engine(512), [(0, other[0], 24), (2, prompt, 20), (12, other[1], 6)], "r1")
    assert len(alone) == len(together) == 20
    assert any(mixed), "the batch never mixed the sequence's rows with another prefill"
    for i, (a, b) in enumerate(zip(alone, together)):
        assert torch.equal(a, b), f"token {i}: max |diff| {(a - b).abs().max().item():.3g}"
