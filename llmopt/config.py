"""Model and engine configuration.

``ModelConfig`` is read from a Hugging Face ``config.json`` (through transformers' own config class,
so every field keeps its documented meaning) or built from GGUF metadata. Architectures differ
only by the flags here: q/k/v bias, q/k RMSNorm, tied embeddings, GQA, rope parameters and
per-layer sliding windows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: ``taskset``, cgroup cpusets), not the
    machine's count: more threads than usable CPUs spin against each other (measured: an eval
    pinned to one core took 13 s per item with two threads, 1.9 s with one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1

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


KV_POLICIES: tuple[str, ...] = ("full", "streaming", "snapkv", "h2o", "quest")


def check_kv_policy(policy: str, budget: float | int | None, *, field: str = "kv_policy") -> None:
    """ValueError naming what is wrong with a (policy, budget) pair; minimums are checked by
    :class:`KVPolicy` where the sink and window sizes are known."""
    if policy not in KV_POLICIES:
        raise ValueError(f"{field} must be one of {', '.join(KV_POLICIES)}, got {policy!r}")
    if policy == "full":
        if budget is not None:
            raise ValueError("kv_budget needs kv_policy 'streaming', 'snapkv', 'h2o' or 'quest' (the 'full' policy "
                             "keeps everything)")
        return
    if budget is None:
        raise ValueError(f"kv_policy {policy!r} needs kv_budget: a fraction in (0, 1] or a token count")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"kv_budget must be a fraction in (0, 1] or a token count, got {budget!r}")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(f"a fractional kv_budget must be in (0, 1], got {budget}; give a token count as an integer")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"a kv_budget token count must be >= 1, got {budget}")


def check_quest_pin(pin: float, *, field: str = "kv_quest_pin") -> None:
    """ValueError unless ``pin`` is a fraction in [0, 1] (of Quest's per-step block budget)."""
    if isinstance(pin, bool) or not isinstance(pin, (int, float)) or not 0.0 <= pin <= 1.0:
        raise ValueError(f"{field} must be a fraction in [0, 1] of Quest's per-step block budget, got {pin!r}")


def parse_kv_budget(text: str | None) -> float | int | None:
    """CLI spelling: ``"0.25"`` -> 0.25 (fraction), ``"2048"`` -> 2048 (tokens), ``None`` -> None."""
    if text is None or text.strip() == "":
        return None
    t = text.strip()
    try:
        return float(t) if any(c in t for c in ".eE") else int(t)
    except ValueError:
        raise ValueError(f"--kv-budget takes a fraction like 0.25 or a token count like 2048, got {text!r}") from None


@dataclass(frozen=True)
class KVPolicy:
    name: str
    budget: float | int
    sinks: int = 4
    window: int = 32
    pool: int = 15
    # quest: fraction of each decode step's block budget that goes to the blocks the prompt's
    # observation window voted for at the end of the prefill ("pinned", kernels/quest.py); 0: plain Quest
    pin: float = 0.0

    def __post_init__(self) -> None:
        check_kv_policy(self.name, self.budget)
        check_quest_pin(self.pin)
        if self.pin and self.name != "quest":
            raise ValueError(f"kv_quest_pin applies to kv_policy 'quest', not {self.name!r}")
        if self.name == "streaming" and isinstance(self.budget, int) and self.budget <= self.sinks:
            raise ValueError(f"kv_budget {self.budget} does not exceed kv_sinks {self.sinks}: a streaming cache "
                             f"keeps the sinks plus at least one recent token; raise kv_budget")
        if self.name == "snapkv" and isinstance(self.budget, int) and self.budget < self.window:
            raise ValueError(f"kv_budget {self.budget} is below the SnapKV observation window kv_window "
                             f"{self.window}, which is always kept; raise kv_budget or lower kv_window")
        if self.name == "h2o" and isinstance(self.budget, int) and self.budget <= self.sinks + self.window:
            raise ValueError(f"kv_budget {self.budget} does not exceed kv_sinks + kv_window = {self.sinks} + "
                             f"{self.window}: an h2o cache keeps the sinks and the recent window plus at least one "
                             f"heavy hitter; raise kv_budget or lower kv_sinks / kv_window")

    @property
    def minimum(self) -> int:
        return {"streaming": self.sinks + 1, "snapkv": self.window, "h2o": self.sinks + self.window + 1}.get(self.name, 1)

    @property
    def observes(self) -> bool:
        """Whether the prefill's last chunk scores the prompt with its last ``window`` queries: snapkv
        (to select), h2o (its starting mass), quest with pins (to pin)."""
        return self.name in ("snapkv", "h2o") or bool(self.pin)

    def tokens(self, length: int) -> int | None:
        """Rows to keep (quest: to read per decode step) for a sequence of ``length`` cached tokens,
        or None (no compression)."""
        b = self.budget
        keep = max(self.minimum, math.ceil(b * length)) if isinstance(b, float) else int(b)
        return None if keep >= length else keep


KV_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "int8", "fp8")

_FALSE = ("0", "", "false", "no", "off")
_TRUE = ("1", "true", "yes", "on")


def _env_auto_bool(environ: Mapping[str, str], name: str) -> bool | None:
    """None when unset, empty or "auto"; True / False for the usual spellings; ValueError otherwise."""
    raw = environ.get(name, "").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw in _TRUE or raw in _FALSE:
        return raw in _TRUE
    raise ValueError(f"{name}={raw!r}: use 1 (on), 0 (off) or auto (unset: auto)")


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
    ``LLMOPT_FUSED_DECODE``     ``fused_decode``     one native call per int4 or GGUF decode step ("0": off)
    ``LLMOPT_QUANT_LM_HEAD``    ``quant_lm_head``,   "0"/"1" or a format name for the head when
                                ``lm_head_fmt``      quantizing on load (default int8)
    ``LLMOPT_QUANT_EMBED``      ``quant_embed``      a tied embedding shares the quantized head
                                                     ("0": float)
    ``LLMOPT_GGUF_ACT``         ``gguf_act``         activations of GGUF-native projections: "fp32"
                                                     (= dequantized model up to summation order),
                                                     "int8" (per 32, like llama.cpp's Q8; types with
                                                     an int8 kernel, others stay fp32) or "by-kind"
                                                     (prompt tokens int16 or fp32, generated int8)
    ``LLMOPT_GGUF_BF16X3``      ``gguf_bf16x3``      fp32 prompt rows of GGUF projections on AMX-BF16
                                                     tiles where the CPU has them ("0": the fp32
                                                     chain, the same bits on every CPU)
    ``LLMOPT_GGUF_PROMPT_INT16`` ``gguf_prompt_int16`` by-kind prompt rows of GGUF projections with
                                                     int16 activations (per 32 k, ~2e-5 relative
                                                     error): unset / "auto" where faster than fp32
                                                     (VNNI builds), "1" always, "0" never (exact
                                                     fp32); AMX-BF16 tiles still win where present
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
    gguf_act: str = "by-kind"
    gguf_bf16x3: bool = True
    gguf_prompt_int16: bool | None = None  # None: where int16 is faster (kernels.gguf_linear.int16_fast)

    def __post_init__(self) -> None:
        if self.int4_act not in ("int8", "fp32"):
            raise ValueError(f"int4_act (LLMOPT_INT4_ACT) must be 'int8' or 'fp32', got {self.int4_act!r}")
        if self.gguf_act not in ("fp32", "int8", "by-kind"):
            raise ValueError(f"gguf_act (LLMOPT_GGUF_ACT) must be 'fp32', 'int8' or 'by-kind', got {self.gguf_act!r}")
        if self.int4_a8_max_m < 0 or self.large_m < 0:
            raise ValueError("int4_a8_max_m and large_m must be >= 0")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KernelSettings:
        """Defaults overridden by the ``LLMOPT_*`` variables above (``environ``: default ``os.environ``)."""
        env = os.environ if environ is None else environ
        large_m = _env_int(env, "LLMOPT_QLINEAR_LARGE_M", cls.large_m)
        head = env.get("LLMOPT_QUANT_LM_HEAD", "int8").strip()
        return cls(
            int4_act=env.get("LLMOPT_INT4_ACT", cls.int4_act),
            int4_a8_max_m=_env_int(env, "LLMOPT_INT4_A8_MAX_M", large_m),
            large_m=large_m,
            decode_tiles=env.get("LLMOPT_DECODE_TILES", "1") != "0",
            fused_decode=env.get("LLMOPT_FUSED_DECODE", "1").strip().lower() not in _FALSE,
            quant_lm_head=head.lower() not in _FALSE,
            lm_head_fmt=None if head.lower() in _FALSE + _TRUE else head,
            quant_embed=env.get("LLMOPT_QUANT_EMBED", "1").strip().lower() not in _FALSE,
            gguf_act=env.get("LLMOPT_GGUF_ACT", cls.gguf_act),
            gguf_bf16x3=env.get("LLMOPT_GGUF_BF16X3", "1").strip().lower() not in _FALSE,
            gguf_prompt_int16=_env_auto_bool(env, "LLMOPT_GGUF_PROMPT_INT16"),
        )


SPECULATIVE_METHODS = ("ngram",)


def parse_speculative(value: str) -> str | None:
    """``--speculative METHOD|off`` -> the ``EngineConfig.speculative`` value (None = off)."""
    if value not in (*SPECULATIVE_METHODS, "off"):
        raise ValueError(f"--speculative must be one of {', '.join(SPECULATIVE_METHODS)} or off, got {value!r}")
    return None if value == "off" else value


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
    num_threads: int | None = None  # torch intra-op threads; None: usable_cpus()
    dtype: str = "float32"  # float32 | bfloat16
    packed_linear: bool = True  # fp32 linears on pre-packed weights (kernels/dense.py); False: torch's GEMM
    kernels: KernelSettings | None = None  # None: KernelSettings.from_env() (defaults + LLMOPT_* overrides)
    # KV compression (llmopt/engine/kv_policy.py, docs/long_context.md): "full" | "streaming" | "snapkv" | "h2o"
    # (heavy hitters by attention mass accumulated over decode) | "quest" (sparse decode attention: keeps every
    # row, reads the top blocks per decode step); kv_budget:
    # fraction of the prompt (quest: of the context) in (0, 1] or a token count; a request may override both
    kv_policy: str = "full"
    kv_budget: float | int | None = None
    kv_sinks: int = 4  # streaming, h2o: attention-sink tokens always kept (<= block_size)
    kv_window: int = 32  # snapkv, h2o: observation window (the last prompt tokens); h2o: also the recent rows kept
    kv_pool: int = 15  # snapkv, h2o (initial scores): max-pooled over this many neighbouring positions (odd)
    kv_quest_dense_layers: int = 2  # quest: the first layers attend densely (as in the Quest paper)
    # quest: up to this fraction of each decode step's block budget goes to blocks pinned at the end of the
    # prefill, per (layer, kv head), by the prompt's observation-window vote (SnapKV's scores); 0: plain Quest
    kv_quest_pin: float = 0.0
    # KV cache element type: None = dtype; "float32", "bfloat16", "float16" (a float32 model's K/V at half the
    # bytes, llama.cpp's default cache type), "int8" or "fp8" (per-token, per-head scales)
    kv_dtype: str | None = None
    # speculative decoding (llmopt/engine/speculative.py): None = off; "ngram" = drafts looked up in the
    # sequence's own prompt and output (greedy requests), verified in the same step: the same tokens, fewer steps
    speculative: str | None = None
    num_speculative_tokens: int = 3  # most drafts per sequence and step
    prompt_lookup_max: int = 4  # longest n-gram matched
    prompt_lookup_min: int = 1  # shortest n-gram matched
    spec_max_rows: int = 16  # most rows of a step (decode rows + drafts) when drafts are handed out
    # drafts only while at most this many sequences run: a draft row costs little in a one-sequence step and
    # about a decode row's time once several run (GGUF Q8_0 step, Zen 4, 200-token contexts: 1 seq 1 -> 4
    # rows +0.8 ms; 2 seqs 2 -> 4 rows +1.75 ms; 4 seqs 4 -> 8 rows +3.6 ms on 8.6; docs/reasoning.md)
    spec_max_batch: int = 2
    # a decode step's time in units of its fixed part (weights read, per-step work): + spec_row_cost per row
    # + spec_tile_cost per register tile of spec_tile_rows rows (speculative.step_cost); drafts join a step
    # only while they pay for their rows (speculative.allot). Measured on the GGUF Q8_0 step, Zen 4.
    spec_row_cost: float = 0.1
    spec_tile_cost: float = 0.3
    spec_tile_rows: int = 4
    # difficulty probe (llmopt.reasoning.difficulty) for requests with SamplingParams.difficulty_exit: a probe file
    # (`llmopt train probe`); None = the one a registry model ships (its own weights, no other adapter), if any
    difficulty_probe: str | None = None

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be positive")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if not 0 <= self.kv_sinks <= self.block_size:
            raise ValueError(f"kv_sinks must be in [0, block_size={self.block_size}], got {self.kv_sinks}")
        if self.kv_window < 2:
            raise ValueError(f"kv_window must be >= 2, got {self.kv_window}")
        if self.kv_pool < 1 or self.kv_pool % 2 == 0:
            raise ValueError(f"kv_pool must be an odd number >= 1, got {self.kv_pool}")
        if self.kv_quest_dense_layers < 0:
            raise ValueError(f"kv_quest_dense_layers must be >= 0, got {self.kv_quest_dense_layers}")
        check_quest_pin(self.kv_quest_pin)
        if self.kv_quest_pin and self.kv_policy != "quest":
            raise ValueError(f"kv_quest_pin pins blocks for Quest's sparse reads: it needs kv_policy='quest' "
                             f"(got {self.kv_policy!r}); drop it or use --kv-policy quest")
        self.kv_policy_for(self.kv_policy, self.kv_budget)  # a bad policy or budget: ValueError now
        if self.kv_dtype is not None and self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)} (or None: the model's dtype), "
                             f"got {self.kv_dtype!r}")
        if self.kv_dtype in ("float32", "bfloat16") and self.kv_dtype != self.dtype:
            raise ValueError(f"kv_dtype {self.kv_dtype} with dtype {self.dtype} is not supported: a float KV cache "
                             f"has the activations' dtype; leave kv_dtype unset or use 'int8' or 'fp8'")
        if self.kv_dtype == "float16" and self.dtype != "float32":
            raise ValueError(f"kv_dtype float16 stores a float32 model's K/V at half the bytes; with dtype {self.dtype} "
                             f"leave kv_dtype unset or use 'int8' or 'fp8'")
        if self.kv_dtype == "float16" and self.kv_policy == "quest":
            raise ValueError("kv_policy 'quest' does not read a float16 KV cache: use kv_dtype float32 (unset), int8 "
                             "or fp8 with Quest")
        self._check_speculative()
        if self.num_threads is None:
            env = os.environ.get("LLMOPT_NUM_THREADS")
            self.num_threads = int(env) if env else usable_cpus()
        if self.kernels is None:
            self.kernels = KernelSettings.from_env()

    def _check_speculative(self) -> None:
        """ValueError naming the bad speculative-decoding setting."""
        if self.speculative is not None and self.speculative not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE_METHODS)} or None (off), "
                             f"got {self.speculative!r}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max <= 16:
            raise ValueError(f"prompt lookup needs 1 <= prompt_lookup_min <= prompt_lookup_max <= 16, got "
                             f"min {self.prompt_lookup_min}, max {self.prompt_lookup_max}")
        if self.spec_max_rows < 2:
            raise ValueError(f"spec_max_rows must be >= 2 (one decode row and one draft), got {self.spec_max_rows}")
        if not (0 <= self.spec_row_cost <= 10 and 0 <= self.spec_tile_cost <= 10):
            raise ValueError(f"spec_row_cost and spec_tile_cost must be in [0, 10], got {self.spec_row_cost}, "
                             f"{self.spec_tile_cost}")
        if self.spec_max_batch < 1:
            raise ValueError(f"spec_max_batch must be >= 1, got {self.spec_max_batch}")
        if not 1 <= self.spec_tile_rows <= 64:
            raise ValueError(f"spec_tile_rows must be in [1, 64], got {self.spec_tile_rows}")

    def kv_policy_for(self, policy: str | None = None, budget: float | int | None = None,
                      quest_pin: float | None = None) -> KVPolicy | None:
        """The ``KVPolicy`` for a request's (policy, budget, Quest pin fraction) override, or the
        engine's; None for 'full'. ValueError for a bad pair, naming what is wrong."""
        if policy is None:
            policy, budget = self.kv_policy, self.kv_budget if budget is None else budget
        check_kv_policy(policy, budget)
        if policy == "full":
            return None
        assert budget is not None
        pin = (self.kv_quest_pin if quest_pin is None else quest_pin) if policy == "quest" else 0.0
        if (policy in ("snapkv", "h2o") or pin) and self.kv_window > self.max_num_batched_tokens:
            raise ValueError(f"{policy} needs kv_window ({self.kv_window}) <= max_num_batched_tokens "
                             f"({self.max_num_batched_tokens}): the prefill's last chunk holds the whole window")
        return KVPolicy(policy, budget, self.kv_sinks, self.kv_window, self.kv_pool, pin)

    @property
    def kernel_settings(self) -> KernelSettings:
        """``kernels`` as resolved by ``__post_init__``."""
        return self.kernels if self.kernels is not None else KernelSettings()

    @property
    def threads(self) -> int:
        """``num_threads`` as resolved by ``__post_init__`` (never None after construction)."""
        return self.num_threads or 1

    @property
    def torch_kv_dtype(self) -> torch.dtype:
        """The KV cache's element type (int8 / fp8 e4m3: with per-token, per-head float32 scales)."""
        return {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "float16": torch.float16}.get(self.kv_dtype or "",
                                                                                          self.torch_dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float32 if self.dtype == "float32" else torch.bfloat16
