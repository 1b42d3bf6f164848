"""The "gguf" linear method: a GGUF file's projections run on their own quantized blocks.

``load_model(path, gguf_native=True)`` (what ``LLM("x.gguf")`` does by default) builds the model
with :func:`gguf_quant_config`: every projection whose tensors have a native kernel
(``llmopt.kernels.gguf_linear.supported_types``: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K ... Q6_K) is a
:class:`GGUFLinear` holding the file's blocks repacked once, losslessly, for the kernels; the
output layer is the file's ``output.weight`` or, tied, ``token_embd.weight``; the input embedding
(:class:`GGUFEmbedding`) decodes only the rows it looks up, from the file's own rows.

Activations (``act``, ``KernelSettings.gguf_act``), per row:

* ``"fp32"``: the dequantized fp32 model up to float summation order;
* ``"int8"``: the kernels' int8-activation mode (per row and 32 k, like llama.cpp's Q8 activations)
  for every row, prompt and generated alike;
* ``"by-kind"`` (the default): by token kind: prompt tokens (prefill, recompute after preemption:
  positions before the prompt's end) in int16 where that is faster than fp32 (a build with VNNI, or AVX2:
  ``kernels.gguf_linear.int16_fast``; per row and 32 k, ~2e-5 relative error, held-out ppl +0.0003%),
  else in fp32; generated tokens (decode rows, speculative-verify rows, recomputed generated tokens) in
  int8, whatever else is in the batch (the runner marks each row's kind in ``AttnContext.generated``).
  With ``LLMOPT_GGUF_PROMPT_INT16=0`` the prompt's log-probabilities are exactly the fp32 mode's.

int8 applies to the types with an int8 kernel (``supported_types("int8")``); other parts keep fp32.

Prompt rows (the "fp32" and "by-kind" modes) run on AMX-BF16 tiles where the CPU has them
(``act="bf16x3"`` in ``kernels/gguf_linear.py``: x @ W.T up to fp32 rounding, batch-invariant, not the
fp32 chain's bits; same types as int8), unless :func:`configure` turns it off
(``KernelSettings.gguf_bf16x3``, ``LLMOPT_GGUF_BF16X3=0``). Generated rows never take it (a few rows at a
time: slower there). Elsewhere the "by-kind" mode's prompt rows take int16 activations
(``act="int16"``, batch-invariant) where :func:`configure`'s ``prompt_int16`` says so (None, the default:
where ``int16_fast``; ``KernelSettings.gguf_prompt_int16``, ``LLMOPT_GGUF_PROMPT_INT16``); the "fp32"
mode's never do. Decided when a layer's blocks are set (at load).

Fused projections: ``qkv_proj`` = the q, k, v tensors' rows, ``gate_up_proj`` = gate, up. Shards of
one type are packed as one weight; shards of different types (a Q4_K_M file's Q6_K ``attn_v``) as
consecutive row ranges, one kernel call each. llama-architecture Q/K rows come permuted from the
converter (see ``loader.unpermute_qk``); the blocks run along the input dim, so whole rows are
permuted back before packing.

A tensor of a quantized type without a kernel (IQ types, Q8_1, ...) is dequantized by the loader as
before and its module takes the fallback method (fp32 packed in the engine), with one warning listing
every such tensor and its type; float tensors (F32 / F16 / BF16) take the fallback without one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from llmopt.config import ModelConfig
from llmopt.formats.gguf_quants import dequantize
from llmopt.kernels.gguf_linear import (
    GGUFPacked,
    bf16x3_available,
    dequantize_packed,
    gguf_linear,
    int16_fast,
    pack_gguf,
    supported_types,
)
from llmopt.models.linear import EmbeddingMethod, LinearMethod, QuantConfig, TokenKindLinear

log = logging.getLogger(__name__)

__all__ = ["GGUFLinear", "GGUFEmbedding", "GGUFMethod", "GGUFEmbeddingMethod", "gguf_quant_config", "GGUF_ACTS",
           "configure", "prompt_act"]

GGUF_ACTS = ("fp32", "int8", "by-kind")
PROMPT_BF16X3 = True  # prompt rows on AMX-BF16 tiles where available (configure)
PROMPT_INT16: bool | None = None  # by-kind prompt rows with int16 activations (configure); None: where fast


def configure(bf16x3: bool = True, prompt_int16: bool | None = None) -> None:
    """How GGUF layers loaded from now on run their prompt rows: on AMX-BF16 tiles where the CPU has them
    (``KernelSettings.gguf_bf16x3``), else, in the "by-kind" mode, with int16 activations if
    ``prompt_int16`` (``KernelSettings.gguf_prompt_int16``; None: where ``int16_fast()``), else the fp32
    chain."""
    global PROMPT_BF16X3, PROMPT_INT16
    PROMPT_BF16X3 = bool(bf16x3)
    PROMPT_INT16 = None if prompt_int16 is None else bool(prompt_int16)


def prompt_act(act: str, bf16x3: bool, prompt_int16: bool | None) -> str:
    """The activation of prompt rows in mode ``act`` on this CPU (types with the int8 kernel), given
    :func:`configure`'s two settings."""
    if act == "int8":
        return "int8"
    if bf16x3 and bf16x3_available():
        return "bf16x3"
    if act == "by-kind" and (int16_fast() if prompt_int16 is None else prompt_int16):
        return "int16"
    return "fp32"


@dataclass(frozen=True)
class Shard:
    """Rows of one projection taken from one GGUF tensor (``perm_heads``: undo llama.cpp's Q/K row
    permutation over that many heads)."""

    tensor: object  # llmopt.models.gguf_file.GGUFTensor
    rows: int
    perm_heads: int | None = None

    @property
    def qtype(self) -> int:
        return int(self.tensor.qtype)  # type: ignore[attr-defined]

    def raw_rows(self) -> np.ndarray:
        """The tensor's blocks as ``uint8 [rows, bytes_per_row]``, rows in Hugging Face order."""
        data: np.ndarray = self.tensor.data  # type: ignore[attr-defined]
        raw = np.asarray(data).reshape(self.rows, -1)
        if self.perm_heads is None:
            return raw
        from llmopt.models.loader import unpermute_qk

        order = unpermute_qk(torch.arange(self.rows).unsqueeze(1), self.perm_heads).squeeze(1).numpy()
        return raw[order]


def _pack(shards: list[Shard], in_features: int, name: str) -> list[GGUFPacked]:
    """Consecutive shards of one type packed together (row concatenation: blocks are per row)."""
    groups: list[list[Shard]] = []
    for s in shards:
        if groups and groups[-1][0].qtype == s.qtype:
            groups[-1].append(s)
        else:
            groups.append([s])
    out = []
    for g in groups:
        raw = np.concatenate([s.raw_rows() for s in g]) if len(g) > 1 else g[0].raw_rows()
        out.append(pack_gguf(raw, g[0].qtype, (sum(s.rows for s in g), in_features), name))
    return out


_kinds_memo: list = [None, None, None, None]  # generated, its rows, the prompt rows, a two-run split


def _kind_rows(generated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """(generated rows, prompt rows, split) for a step's token kinds; computed once per step: every
    projection of a step gets the same ``generated`` tensor (built per step, never written; the memo
    holds it, so its identity is not reused while memoized). split: k when the rows are two runs,
    rows [0, k) of one kind and [k, rows) of the other (the runner's order: decode rows, then prefill
    chunks), else None."""
    memo = _kinds_memo
    if memo[0] is not generated:
        gen, prompt = generated.nonzero().flatten(), (~generated).nonzero().flatten()
        first = gen if len(gen) and int(gen[0]) == 0 else prompt
        k = len(first)
        split = k if 0 < k < len(generated) and int(first[-1]) == k - 1 else None
        memo[:] = [generated, gen, prompt, split]
    return memo[1], memo[2], memo[3]


class GGUFLinear(TokenKindLinear):
    """``y = x @ W.T + b`` with ``W`` kept in GGUF blocks (one or more row ranges of
    :class:`~llmopt.kernels.gguf_linear.GGUFPacked`, see the module docstring).

    ``weight`` is the dequantized fp32 weight (a new tensor: inspection, references); the packed
    blocks are not parameters or buffers, so dtype casts of the model do not touch them (a bias is
    a float parameter and is cast like any other).

    ``acts``: each part's activations for generated rows, ``prompt_acts``: for prompt rows (they differ
    only in the "by-kind" mode)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, name: str = "", act: str = "fp32"):
        super().__init__()
        if act not in GGUF_ACTS:
            raise ValueError(f"GGUF activation mode must be one of {', '.join(GGUF_ACTS)}, got {act!r}")
        self.in_features, self.out_features = in_features, out_features
        self.name, self.act = name, act
        self.parts: list[GGUFPacked] = []
        self.acts: list[str] = []
        self.prompt_acts: list[str] = []
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def set_blocks(self, parts: list[GGUFPacked]) -> None:
        rows = sum(p.out_features for p in parts)
        if rows != self.out_features or any(p.in_features != self.in_features for p in parts):
            raise ValueError(f"{self.name}: GGUF blocks {[p.shape for p in parts]} do not make a "
                             f"[{self.out_features}, {self.in_features}] weight")
        self.parts = parts
        a8 = set(supported_types("int8"))
        self.acts = ["int8" if self.act != "fp32" and p.type_name in a8 else "fp32" for p in parts]
        prompt = prompt_act(self.act, PROMPT_BF16X3, PROMPT_INT16)
        self.prompt_acts = [prompt if p.type_name in a8 else "fp32" for p in parts]

    @property
    def type_names(self) -> list[str]:
        return [p.type_name for p in self.parts]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * sum(p.nbytes for p in self.parts) / (self.in_features * self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([dequantize_packed(p) for p in self.parts])

    def forward(self, x: torch.Tensor, generated: torch.Tensor | None = None) -> torch.Tensor:
        """``generated``: bool per row of ``x [rows, K]`` (see ``TokenKindLinear``); None = prompt rows."""
        if generated is None:
            return self._run(x, self.prompt_acts)
        if self.acts == self.prompt_acts:
            return self._run(x, self.acts)
        if generated.shape != x.shape[:1]:
            raise ValueError(f"{self.name}: token kinds for {tuple(generated.shape)} rows, x has shape {tuple(x.shape)}")
        gen_rows, prompt_rows, split = _kind_rows(generated)
        if not len(prompt_rows):
            return self._run(x, self.acts)
        if not len(gen_rows):
            return self._run(x, self.prompt_acts)
        if split is not None:  # two runs: each kind's rows written in place (a 2,047-row prompt chunk's gather
            # and scatter took 2.3 ms per projection, 280 ms per step over 30 layers)
            first, second = (self.acts, self.prompt_acts) if bool(generated[0]) else (self.prompt_acts, self.acts)
            y = x.new_empty(x.shape[0], self.out_features)
            self._run(x[:split], first, y[:split])
            self._run(x[split:], second, y[split:])
            return y
        y = x.new_empty(x.shape[0], self.out_features)
        y[gen_rows] = self._run(x[gen_rows], self.acts)
        y[prompt_rows] = self._run(x[prompt_rows], self.prompt_acts)
        return y

    def _run(self, x: torch.Tensor, acts: list[str], out: torch.Tensor | None = None) -> torch.Tensor:
        parts = self.parts
        if len(parts) == 1:
            return gguf_linear(x, parts[0], self.bias, act=acts[0], out=out)
        ys = [gguf_linear(x, p, None, act=a) for p, a in zip(parts, acts)]
        if out is not None:
            torch.cat(ys, -1, out=out)
            return out if self.bias is None else out.add_(self.bias.to(out.dtype))
        y = torch.cat(ys, -1)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        types = "+".join(dict.fromkeys(self.type_names)) or "empty"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"gguf={types}, act={self.act}, bpw={self.bits_per_weight if self.parts else 0.0:.2f}")


class GGUFEmbedding(nn.Module):
    """``table[ids]`` decoded from the GGUF table's own rows (``raw``: ``uint8 [rows, bytes_per_row]``,
    the file's memory-mapped blocks; blocks run along a row, so gathering rows gathers whole blocks)
    with ``formats.gguf_quants.dequantize``: exactly the dequantized model's rows, only the looked-up
    ones decoded. No second table in memory: the rows are the file's pages (a tied head keeps its
    own packed copy for the matmul).

    Decode-sized lookups (at most ``SMALL`` ids) take rows from a cache of rows decoded before (the
    same ``dequantize`` bits; up to ``CACHE_BYTES`` of them, then it starts over): a decode step's one
    token cost 80-100 us through ``dequantize``, 2% of a SmolLM2 token on 2 cores."""

    SMALL = 64
    CACHE_BYTES = 32 << 20

    def __init__(self, raw: np.ndarray, ggml_type: int, embedding_dim: int, name: str = "token_embd.weight"):
        super().__init__()
        self.raw, self.ggml_type, self.name = raw, int(ggml_type), name
        self.num_embeddings: int = int(raw.shape[0])
        self.embedding_dim: int = int(embedding_dim)
        self.out_dtype = torch.float32
        self._rows: dict[int, torch.Tensor] = {}
        self._cap = max(self.SMALL, self.CACHE_BYTES // (4 * self.embedding_dim))

    @property
    def type_name(self) -> str:
        return gguf.GGMLQuantizationType(self.ggml_type).name

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.raw, self.ggml_type, (self.num_embeddings, self.embedding_dim), self.name)

    def _apply(self, fn, recurse=True):  # a dtype cast of the model sets the output dtype
        probe = fn(torch.zeros(1, dtype=torch.float32))
        if probe.is_floating_point():
            self.out_dtype = probe.dtype
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n, k = self.num_embeddings, self.embedding_dim
        flat = input_ids.reshape(-1)
        if flat.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{self.name}: input ids must be int64 or int32, got {flat.dtype}")
        if 0 < flat.numel() <= self.SMALL:  # a decode step's ids: rows from the cache
            ids = flat.tolist()
            bad = next((t for t in ids if not 0 <= t < n), None)
            if bad is not None:
                raise self._out_of_range(bad)
            out = self._cached_rows(ids)
        else:
            if flat.numel() and (flat.min() < 0 or flat.max() >= n):
                raise self._out_of_range(int(flat[(flat < 0) | (flat >= n)][0]))
            out = dequantize(self.raw[flat.cpu().numpy()], self.ggml_type, (flat.numel(), k), self.name)
        out = out.reshape(*input_ids.shape, k)
        return out if out.dtype == self.out_dtype else out.to(self.out_dtype)

    def _out_of_range(self, t: int) -> IndexError:
        return IndexError(f"{self.name}: token id {t} is out of range [0, {self.num_embeddings})")

    def _cached_rows(self, ids: list[int]) -> torch.Tensor:
        """Rows ``ids`` (in range) stacked, each decoded once and kept (the cache starts over when full)."""
        missing = [t for t in dict.fromkeys(ids) if t not in self._rows]
        if missing:
            if len(self._rows) + len(missing) > self._cap:
                self._rows.clear()
            rows = dequantize(self.raw[np.asarray(missing)], self.ggml_type, (len(missing), self.embedding_dim),
                              self.name)
            self._rows.update(zip(missing, rows))
        return torch.stack([self._rows[t] for t in ids])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, gguf={self.type_name}"


class GGUFMethod(LinearMethod):
    """Projections built from a GGUF file's blocks: ``shards[name]`` lists the rows of each."""

    name = "gguf"

    def __init__(self, shards: dict[str, list[Shard]], act: str = "fp32"):
        if act not in GGUF_ACTS:
            raise ValueError(f"GGUF activation mode must be one of {', '.join(GGUF_ACTS)}, got {act!r}")
        self.shards = shards
        self.act = act

    def create(self, in_features: int, out_features: int, bias: bool, name: str) -> nn.Module:
        return GGUFLinear(in_features, out_features, bias, name, self.act)

    def process_after_loading(self, module: nn.Module, name: str) -> nn.Module:
        if not isinstance(module, GGUFLinear):
            raise TypeError(f"{name}: the gguf method holds a GGUFLinear, got {type(module).__name__}")
        if not module.parts:
            module.set_blocks(_pack(self.shards[name], module.in_features, name))
        return module


# GGUF types the gguf package quantizes in numpy and the kernels run: what LLM(quant="q8_0", ...) can write
GGUF_QUANTIZE_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


class GGUFQuantizeMethod(LinearMethod):
    """A float projection quantized once, after loading, into a GGUF type's blocks (``gguf.quants.quantize``,
    llama.cpp's reference rounding) and run on the native GGUF kernels as a :class:`GGUFLinear`:
    ``LLM(model, quant="q8_0")``, e.g. for a model whose LoRA adapter was merged into float weights. A
    weight whose in_features are not a multiple of the block size keeps ``fallback``, with a warning."""

    def __init__(self, qtype: str, act: str = "fp32", fallback: LinearMethod | None = None):
        if qtype.upper() not in GGUF_QUANTIZE_TYPES:
            raise ValueError(f"quantize-on-load GGUF types: {', '.join(t.lower() for t in GGUF_QUANTIZE_TYPES)}; "
                             f"got {qtype!r}")
        if act not in GGUF_ACTS:
            raise ValueError(f"GGUF activation mode must be one of {', '.join(GGUF_ACTS)}, got {act!r}")
        self.qtype = gguf.GGMLQuantizationType[qtype.upper()]
        self.act = act
        self.fallback = fallback
        self.name = qtype.lower()

    def process_after_loading(self, module: nn.Module, name: str) -> nn.Module:
        if type(module) is not nn.Linear:
            return module
        block = gguf.GGML_QUANT_SIZES[self.qtype][0]
        if module.in_features % block:
            log.warning("quantize on load: keeping %s in float (in_features=%d not a multiple of %s's %d)",
                        name, module.in_features, self.qtype.name, block)
            return module if self.fallback is None else self.fallback.process_after_loading(module, name)
        w = module.weight.detach().float().cpu().numpy()
        raw = gguf.quants.quantize(w, self.qtype)
        out = GGUFLinear(module.in_features, module.out_features, module.bias is not None, name, self.act)
        out.set_blocks([pack_gguf(raw, self.qtype, tuple(w.shape), name)])
        if module.bias is not None:
            assert out.bias is not None
            out.bias.data = module.bias.detach().float().clone()
        return out


class GGUFEmbeddingMethod(EmbeddingMethod):
    """The input embedding on the GGUF table's own rows (``GGUFEmbedding``)."""

    name = "gguf"

    def __init__(self, table: Shard, fallback: EmbeddingMethod):
        self.table = table
        self.fallback = fallback

    def create(self, num_embeddings: int, embedding_dim: int) -> nn.Module:
        # loaded from blocks after loading; nothing for the float loader to fill
        return nn.Module()

    def process_after_loading(self, module: nn.Module, lm_head: nn.Module, tied: bool) -> nn.Module:
        t = self.table.tensor
        return GGUFEmbedding(self.table.raw_rows(), self.table.qtype, int(t.torch_shape[1]),  # type: ignore[attr-defined]
                             t.name)  # type: ignore[attr-defined]


_FUSED = {"qkv_proj": ("attn_q", "attn_k", "attn_v"), "gate_up_proj": ("ffn_gate", "ffn_up")}
_SINGLE = {"o_proj": "attn_output", "down_proj": "ffn_down"}
_ATTN = ("qkv_proj", "o_proj")


def gguf_quant_config(path: Path, cfg: ModelConfig, base: QuantConfig,
                      act: str = "fp32") -> tuple[QuantConfig, set[str]]:
    """The quant config of a GGUF model run on its own blocks, and the Hugging Face names of the
    tensors it takes as blocks (the float loader skips them). Modules whose tensors have no native
    kernel keep ``base``'s method (one warning lists them)."""
    from llmopt.models.gguf_file import GGUFFile

    gf = GGUFFile(path)
    by_name = {t.name: t for t in gf.tensors}
    native = set(supported_types())
    unsupported: list[str] = []

    def shard(gname: str, perm: int | None = None) -> Shard | None:
        t = by_name.get(gname)
        if t is None or len(t.torch_shape) != 2:
            return None
        if t.qtype.name not in native:
            if t.qtype.name not in ("F32", "F16", "BF16"):  # float tensors are not worth a warning
                unsupported.append(f"{gname} ({t.qtype.name})")
            return None
        return Shard(t, int(t.torch_shape[0]), perm if cfg.arch == "llama" else None)

    shards: dict[str, list[Shard]] = {}
    taken: set[str] = set()
    hf_of = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_layers):
        for mod, parts in [*_FUSED.items(), *((m, (g,)) for m, g in _SINGLE.items())]:
            perms = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}
            got = [shard(f"blk.{i}.{g}.weight", perms.get(g)) for g in parts]
            if any(s is None for s in got):
                continue
            name = f"layers.{i}.{'self_attn' if mod in _ATTN else 'mlp'}.{mod}"
            shards[name] = [s for s in got if s is not None]
            taken |= {f"model.layers.{i}.{hf_of[g]}.weight" for g in parts}
    head = shard("token_embd.weight" if cfg.tie_word_embeddings else "output.weight")
    if head is not None:
        shards["lm_head"] = [head]
        if not cfg.tie_word_embeddings:
            taken.add("lm_head.weight")
    embedding = base.embedding
    table = head if cfg.tie_word_embeddings else shard("token_embd.weight")
    if table is not None:
        embedding = GGUFEmbeddingMethod(table, base.embedding)
        taken.add("model.embed_tokens.weight")
    if unsupported:
        log.warning("%s: %d tensors have GGUF types without a native kernel and are dequantized to float: %s",
                    path.name, len(unsupported), ", ".join(dict.fromkeys(unsupported)))
    method = GGUFMethod(shards, act)
    modules = dict(base.modules)
    modules.update({name: method for name in shards})
    qc = QuantConfig(default=base.default, lm_head=base.lm_head, modules=modules, embedding=embedding)
    return qc, taken
