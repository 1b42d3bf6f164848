"""Model and engine configuration.

``ModelConfig`` is read from a Hugging Face ``config.json`` (through transformers' own config class,
so every field keeps its documented meaning) or built from GGUF metadata. Architectures differ
only by the flags here: q/k/v bias, q/k RMSNorm, tied embeddings, GQA, rope parameters and
per-layer sliding windows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")


class ModelLoadError(ValueError):
    """A model path, file or config that cannot be loaded; the message says what to do."""


@dataclass
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections (Qwen2; Llama/Qwen3 when attention_bias=true)
    o_bias: bool  # bias on o_proj (Llama/Qwen3 when attention_bias=true; never Qwen2)
    qk_norm: bool  # RMSNorm on q and k per head (Qwen3)
    layer_windows: list[int | None]  # sliding window per layer, None = full attention
    bos_token_id: int | None
    eos_token_ids: list[int]
    hf_config: Any = field(repr=False, default=None)  # transformers PretrainedConfig (rope parameters)

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        arch = hf.model_type
        if arch not in SUPPORTED_ARCHS:
            raise ModelLoadError(
                f"unsupported architecture {arch!r}: llmopt runs {', '.join(SUPPORTED_ARCHS)}")
        if getattr(hf, "mlp_bias", False):
            raise ModelLoadError("unsupported config: mlp_bias=true (no supported model uses it)")
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"unsupported activation {act!r}: only silu is implemented")
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        layer_types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
        window = getattr(hf, "sliding_window", None)
        layer_windows = [window if t == "sliding_attention" and window else None for t in layer_types]
        eos = hf.eos_token_id
        eos_ids = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
        attention_bias = bool(getattr(hf, "attention_bias", arch == "qwen2"))
        if arch == "qwen2":
            attention_bias = True
        return cls(
            arch=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_bias=attention_bias and arch != "qwen2",
            qk_norm=arch == "qwen3",
            layer_windows=layer_windows,
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_ids=eos_ids,
            hf_config=hf,
        )

    def rope_inv_freq(self) -> tuple[torch.Tensor, float]:
        """(inv_freq, attention_scaling) exactly as transformers computes them for this config."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = getattr(self.hf_config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            base = params.get("rope_theta", 10000.0)
            dim = self.head_dim
            inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            return inv, 1.0
        if rope_type == "dynamic":
            raise ModelLoadError("unsupported rope_type 'dynamic' (its frequencies change with length)")
        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ModelLoadError(f"unsupported rope_type {rope_type!r}")
        inv, scale = ROPE_INIT_FUNCTIONS[rope_type](self.hf_config, torch.device("cpu"))
        return inv.float(), float(scale)


_FALSE = ("0", "", "false", "no", "off")


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number; unset it or give an integer") from None


@dataclass
class KernelSettings:
    """The switches of the kernels and of the engine's quantize-on-load, in one place.

    Defaults are the measured choices (see ``kernels/qlinear.py`` and ``quant/linear.py`` for the
    numbers). Environment variables are overrides for experiments, read once by :meth:`from_env`
    when an ``EngineConfig`` is built without explicit settings (and by the CLI), never at import:

    ==========================  ===================  =============================================
    variable                    field                meaning
    ==========================  ===================  =============================================
    ``LLMOPT_INT4_ACT``         ``int4_act``         "int8" (activations quantized per group for
                                                     int4 decode) or "fp32" (exact int4)
    ``LLMOPT_INT4_A8_MAX_M``    ``int4_a8_max_m``    most rows that take the int8-activation path
    ``LLMOPT_QLINEAR_LARGE_M``  ``large_m``          from this many rows on, dequantize + fp32 GEMM
    ``LLMOPT_DECODE_TILES``     ``decode_tiles``     4-column int4 x int8 tiles ("0": off)
    ``LLMOPT_FUSED_DECODE``     ``fused_decode``     one native call per int4 decode step ("0": off)
    ``LLMOPT_QUANT_LM_HEAD``    ``quant_lm_head``,   "0"/"1" or a format name for the head when
                                ``lm_head_fmt``      quantizing on load (default int8)
    ``LLMOPT_QUANT_EMBED``      ``quant_embed``      a tied embedding shares the quantized head
                                                     ("0": float)
    ``LLMOPT_GGUF_ACT``         ``gguf_act``         activations of GGUF-native projections: "fp32"
                                                     (= dequantized model up to summation order)
                                                     or "int8" (per 32, like llama.cpp's Q8; Q4_0,
                                                     Q4_1, Q8_0, Q4_K only, others stay fp32)
    ==========================  ===================  =============================================

    Build-time variables stay with the build (``kernels/build.py``): ``LLMOPT_NATIVE``,
    ``LLMOPT_CACHE``, ``LLMOPT_W4_PREFETCH``; ``LLMOPT_NUM_THREADS`` is ``EngineConfig.num_threads``.
    """

    int4_act: str = "int8"
    int4_a8_max_m: int = 64
    large_m: int = 64
    decode_tiles: bool = True
    fused_decode: bool = True
    quant_lm_head: bool = True
    lm_head_fmt: str | None = "int8"  # None: the model's format
    quant_embed: bool = True
    gguf_act: str = "fp32"

    def __post_init__(self) -> None:
        if self.int4_act not in ("int8", "fp32"):
            raise ValueError(f"int4_act (LLMOPT_INT4_ACT) must be 'int8' or 'fp32', got {self.int4_act!r}")
        if self.gguf_act not in ("int8", "fp32"):
            raise ValueError(f"gguf_act (LLMOPT_GGUF_ACT) must be 'fp32' or 'int8', got {self.gguf_act!r}")
        if self.int4_a8_max_m < 0 or self.large_m < 0:
            raise ValueError("int4_a8_max_m and large_m must be >= 0")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KernelSettings:
        """Defaults overridden by the ``LLMOPT_*`` variables above (``environ``: default ``os.environ``)."""
        env = os.environ if environ is None else environ
        large_m = _env_int(env, "LLMOPT_QLINEAR_LARGE_M", cls.large_m)
        head = env.get("LLMOPT_QUANT_LM_HEAD", "int8").strip()
        on = ("1", "true", "yes", "on")
        return cls(
            int4_act=env.get("LLMOPT_INT4_ACT", cls.int4_act),
            int4_a8_max_m=_env_int(env, "LLMOPT_INT4_A8_MAX_M", large_m),
            large_m=large_m,
            decode_tiles=env.get("LLMOPT_DECODE_TILES", "1") != "0",
            fused_decode=env.get("LLMOPT_FUSED_DECODE", "1").strip().lower() not in _FALSE,
            quant_lm_head=head.lower() not in _FALSE,
            lm_head_fmt=None if head.lower() in _FALSE + on else head,
            quant_embed=env.get("LLMOPT_QUANT_EMBED", "1").strip().lower() not in _FALSE,
            gguf_act=env.get("LLMOPT_GGUF_ACT", cls.gguf_act),
        )


@dataclass
class EngineConfig:
    """Knobs of the serving engine (defaults sized for a 2-core CPU)."""

    max_num_seqs: int = 64  # most sequences decoded together in one step
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None: sized from kv_cache_memory_gb
    kv_cache_memory_gb: float = 2.0
    max_model_len: int | None = None  # None: min(model's context, 8192)
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # torch intra-op threads; None: os.cpu_count()
    dtype: str = "float32"  # float32 | bfloat16
    packed_linear: bool = True  # fp32 linears on pre-packed weights (kernels/dense.py); False: torch's GEMM
    kernels: KernelSettings | None = None  # None: KernelSettings.from_env() (defaults + LLMOPT_* overrides)

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be positive")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.num_threads is None:
            env = os.environ.get("LLMOPT_NUM_THREADS")
            self.num_threads = int(env) if env else (os.cpu_count() or 1)
        if self.kernels is None:
            self.kernels = KernelSettings.from_env()

    @property
    def kernel_settings(self) -> KernelSettings:
        """``kernels`` as resolved by ``__post_init__``."""
        return self.kernels if self.kernels is not None else KernelSettings()

    @property
    def threads(self) -> int:
        """``num_threads`` as resolved by ``__post_init__`` (never None after construction)."""
        return self.num_threads or 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float32 if self.dtype == "float32" else torch.bfloat16
