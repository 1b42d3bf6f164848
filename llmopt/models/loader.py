"""Load a model from a Hugging Face directory, a GGUF file or a registry name.

- HF directory: ``config.json`` + ``model.safetensors`` or sharded ``model-*.safetensors`` with
  ``model.safetensors.index.json`` + ``tokenizer.json``.
- GGUF: read with the ``gguf`` package; tensors dequantized by ``gguf_quants`` exactly as
  llama.cpp defines them; llama-architecture Q/K rows un-permuted (llama.cpp's converter permutes
  them for its rope kernel) so that logits match transformers.
Errors are ``ModelLoadError`` with one line that names the problem.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmopt.config import SUPPORTED_ARCHS, ModelConfig, ModelLoadError
from llmopt.models.linear import QuantConfig
from llmopt.models.registry import adapter_for, resolve
from llmopt.models.tokenizer import Tokenizer
from llmopt.models.transformer import Transformer
from llmopt.models.validate import finite_weights

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    source: Path
    load_seconds: float


def open_checkpoint(model: str | Path) -> tuple[ModelConfig, Tokenizer, Iterator[tuple[str, torch.Tensor]], Path]:
    """Resolve ``model`` and open it: (config, tokenizer, lazy HF-named fp32 weights, file or dir)."""
    path = resolve(model)
    if path.is_dir():
        if (path / "config.json").exists():
            return (*open_hf_dir(path), path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelLoadError(
                f"directory {str(path)!r} has no config.json" +
                (f" and {len(ggufs)} .gguf files (name one)" if ggufs else " and no .gguf file") +
                ": give a Hugging Face model directory or a GGUF file")
        path = ggufs[0]
    return (*_open_gguf(path), path)


CheckpointReader = Callable[[Path, torch.dtype, "int | None", "QuantConfig | None"], "LoadedModel"]


@dataclass(frozen=True)
class CheckpointFormat:
    """A checkpoint layout that a package above ``models`` knows how to read (e.g. ``llmopt
    quantize`` output, registered by ``llmopt.quant.checkpoint``). ``detect(path)`` says whether a
    resolved path is one; ``read(path, dtype, max_positions, quant_config)`` loads it as a
    ``LoadedModel``, its own methods for what it stores quantized and ``quant_config`` (the
    caller's) for the rest."""

    name: str
    detect: Callable[[Path], bool]
    read: CheckpointReader


_CHECKPOINT_FORMATS: dict[str, CheckpointFormat] = {}


def register_checkpoint_format(name: str, detect: Callable[[Path], bool], read: CheckpointReader) -> None:
    """Teach :func:`load_model` a checkpoint layout (tried in registration order, before the plain
    Hugging Face directory / GGUF readers). Registering a name again replaces it."""
    _CHECKPOINT_FORMATS[name] = CheckpointFormat(name, detect, read)


def checkpoint_formats() -> list[str]:
    return list(_CHECKPOINT_FORMATS)


def load_model(model: str | Path, dtype: torch.dtype = torch.float32,
               max_positions: int | None = None, quant_config: QuantConfig | None = None,
               gguf_native: bool = False, gguf_act: str = "fp32",
               adapter: str | Path | None = None) -> LoadedModel:
    """Load ``model`` (registry name, HF directory, GGUF file, registered checkpoint format) built
    with ``quant_config`` (default: float ``nn.Linear`` projections, the Hugging Face model).

    ``gguf_native``: for a GGUF source, every projection, the output layer and the embedding keep
    the file's own quantized blocks (``llmopt.models.gguf_linear``; tensors of a type without a
    native kernel are dequantized with a warning and use ``quant_config``'s method); ignored for
    other sources and for a registry model with a LoRA adapter (merged in fp32). ``gguf_act``:
    their activations, "fp32" (exact up to summation order), "int8" (the kernels' int8 mode) or
    "by-kind" (prompt tokens fp32, generated tokens int8; see ``models.gguf_linear``).
    ``adapter``: a LoRA adapter file (``llmopt train``'s ``adapter.safetensors``) merged in fp32,
    instead of the one a registry name carries; refused when it was trained on another base."""
    t0 = time.perf_counter()
    src = resolve(model)
    if adapter is not None and not Path(adapter).is_file():
        raise ModelLoadError(f"adapter {str(adapter)!r} does not exist: give the adapter.safetensors "
                             "that `llmopt train` wrote")
    for fmt in _CHECKPOINT_FORMATS.values():
        if fmt.detect(src):
            if adapter is not None:
                raise ModelLoadError(f"{model} is a {fmt.name} checkpoint: an adapter merges into float weights, "
                                     "so load its base model (a registry name, HF directory or .gguf) instead")
            return fmt.read(src, dtype, max_positions, quant_config)
    cfg, tok, weights, path = open_checkpoint(model)
    adapter = Path(adapter) if adapter is not None else adapter_for(model)
    if gguf_native and path.suffix == ".gguf" and adapter is None:
        from llmopt.models.gguf_linear import gguf_quant_config

        quant_config, native = gguf_quant_config(path, cfg, quant_config or QuantConfig(), gguf_act)
        weights = iter_gguf_floats(path, cfg, skip=native)  # blocks, not floats, for these
    elif gguf_native and adapter is not None:
        log.info("%s has a LoRA adapter merged in fp32: its GGUF blocks are dequantized", model)
    net = empty_model(cfg, max_positions, quant_config)
    fill_weights(net, weights, torch.float32 if adapter else dtype, path.name, process=adapter is None)
    if adapter is not None:  # a registry model = base file + LoRA, merged in fp32
        from llmopt.models.adapter import load_adapter, merge_adapter

        merge_adapter(net, load_adapter(adapter), f"adapter of {model}")
        if dtype != torch.float32:
            net.to(dtype)
            net.cos_sin = net.cos_sin.float()
        net.process_weights_after_loading()
    secs = time.perf_counter() - t0
    log.info("loaded %s (%s, %d layers) in %.2f s", path, cfg.arch, cfg.num_layers, secs)
    return LoadedModel(net, tok, cfg, path, secs)


def empty_model(cfg: ModelConfig, max_positions: int | None = None,
                quant_config: QuantConfig | None = None) -> Transformer:
    """An uninitialized CPU model for ``cfg`` (weights still to load) built with ``quant_config``,
    its rope table computed and a float lm_head tied to the float embedding where the config says
    so. ``max_positions`` caps the rope table."""
    n_pos = min(max_positions or cfg.max_position_embeddings, cfg.max_position_embeddings)
    with torch.device("meta"):
        net = Transformer(cfg, max_positions=n_pos, quant_config=quant_config)
    net.to_empty(device="cpu")
    net.reset_buffers()
    return net


def fill_weights(net: Transformer, weights: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype,
                 source: str, process: bool = True) -> None:
    """Load Hugging Face-named float tensors into ``net`` (errors name ``source``), cast to ``dtype``
    (the rope table stays float32), switch to eval mode and (``process``) give every projection its
    linear method's final form (``Transformer.process_weights_after_loading``)."""
    try:
        net.load_weights(finite_weights(weights, source))
    except ModelLoadError:
        raise
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"{source}: {e.args[0] if e.args else e}") from None
    if dtype != torch.float32:
        net.to(dtype)
        net.cos_sin = net.cos_sin.float()
    net.eval()
    if process:
        net.process_weights_after_loading()


def load_transformers_model(model: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """The unoptimized original: a transformers ``AutoModelForCausalLM`` holding exactly the weights
    llmopt loads (dequantized GGUF or safetensors), for baselines and parity checks."""
    from transformers import AutoModelForCausalLM

    cfg, _, weights, _ = open_checkpoint(model)
    hf = AutoModelForCausalLM.from_config(cfg.hf_config, dtype=torch.float32)
    state = dict(weights)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"transformers model does not fit the checkpoint: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    return hf.to(dtype).eval()


# ---- Hugging Face directories ---------------------------------------------------------------
def open_hf_dir(path: Path) -> tuple[ModelConfig, Tokenizer, Iterator[tuple[str, torch.Tensor]]]:
    from transformers import AutoConfig, GenerationConfig

    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    arch = raw.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(f"unsupported architecture {arch!r} in {path / 'config.json'}: "
                             f"llmopt runs {', '.join(SUPPORTED_ARCHS)}")
    hf = AutoConfig.from_pretrained(path)
    cfg = ModelConfig.from_hf(hf)
    if (path / "generation_config.json").exists():
        gen = GenerationConfig.from_pretrained(path)
        eos = gen.eos_token_id
        if eos is not None:
            cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | set(eos if isinstance(eos, list) else [eos]))
    files = _safetensors_files(path)
    try:
        tok = Tokenizer.from_dir(str(path), cfg.eos_token_ids)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer from {str(path)!r} ({type(e).__name__}: {e}); "
                             "the directory needs tokenizer.json (or tokenizer_config.json + vocab)") from None
    return cfg, tok, _iter_safetensors(files)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
        missing = [str(f.name) for f in files if not f.exists()]
        if missing:
            raise ModelLoadError(f"{index.name} names shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"directory {str(path)!r} has config.json but no *.safetensors weights")
    return files


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name).float()
        except SafetensorError as e:
            raise ModelLoadError(f"{f.name} is not a readable safetensors file: {e}") from None


# ---- GGUF -----------------------------------------------------------------------------------
_GGUF_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_to_hf_name(name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (None if unknown)."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_TENSOR_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_TENSOR_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GGUF_TENSOR_NAMES:
        return f"{_GGUF_TENSOR_NAMES[parts[0]]}.{parts[1]}"
    return None


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute(weights, n_head)`` of llama-architecture Q/K rows."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _open_gguf(path: Path) -> tuple[ModelConfig, Tokenizer, Iterator[tuple[str, torch.Tensor]]]:
    from llmopt.models.gguf_file import GGUFFile, GGUFFormatError

    try:
        gf = GGUFFile(path)
    except GGUFFormatError as e:
        raise ModelLoadError(f"model file {str(path)!r}: {e}; give a .gguf file or a Hugging Face directory") from None
    fields = gf.fields
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(f"unsupported architecture {arch!r} in {path.name}: llmopt runs {', '.join(SUPPORTED_ARCHS)}")
    tensor_names = {t.name for t in gf.tensors}
    hf = _gguf_hf_config(arch, fields, tensor_names)
    cfg = ModelConfig.from_hf(hf)
    tok = Tokenizer.from_gguf_fields(arch, fields, cfg.eos_token_ids)
    cfg.eos_token_ids = tok.eos_token_ids
    return cfg, tok, _iter_gguf(gf, cfg, path)


def _gguf_hf_config(arch: str, f: dict[str, Any], tensor_names: set[str]) -> Any:
    from transformers import AutoConfig

    def need(key: str) -> Any:
        if f"{arch}.{key}" not in f:
            raise ModelLoadError(f"GGUF metadata lacks {arch}.{key}: the file is incomplete")
        return f[f"{arch}.{key}"]

    n_head = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    n_kv = int(f.get(f"{arch}.attention.head_count_kv", n_head))
    if n_head < 1 or hidden < 1 or not 1 <= n_kv <= n_head or n_head % n_kv:
        raise ModelLoadError(f"GGUF metadata is inconsistent: {arch}.attention.head_count={n_head}, "
                             f"head_count_kv={n_kv}, embedding_length={hidden} (need positive counts and "
                             f"head_count a multiple of head_count_kv); the file is corrupt or not a model")
    head_dim = int(f.get(f"{arch}.attention.key_length") or f.get(f"{arch}.rope.dimension_count") or hidden // n_head)
    vocab = int(f.get(f"{arch}.vocab_size") or len(f.get("tokenizer.ggml.tokens") or []))
    rope: dict[str, Any] = {"rope_theta": float(f.get(f"{arch}.rope.freq_base", 10000.0)), "rope_type": "default"}
    scaling = f.get(f"{arch}.rope.scaling.type")
    if scaling in ("linear", "yarn"):
        rope["rope_type"] = scaling
        rope["factor"] = float(f[f"{arch}.rope.scaling.factor"])
        if scaling == "yarn":
            rope["original_max_position_embeddings"] = int(f[f"{arch}.rope.scaling.original_context_length"])
    elif scaling not in (None, "none"):
        raise ModelLoadError(f"unsupported GGUF rope scaling {scaling!r}")
    eos = [f["tokenizer.ggml.eos_token_id"]] if "tokenizer.ggml.eos_token_id" in f else []
    if "tokenizer.ggml.eot_token_id" in f:
        eos.append(f["tokenizer.ggml.eot_token_id"])
    kw = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(f.get(f"{arch}.attention.head_count_kv", n_head)),
        head_dim=head_dim,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(f.get(f"{arch}.context_length", 4096)),
        rope_parameters=rope,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
    )
    if arch == "llama":
        kw["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    return AutoConfig.for_model(arch, **kw)


def iter_gguf_floats(path: Path, cfg: ModelConfig, skip: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The GGUF file's tensors as Hugging Face-named fp32 tensors, except those named in ``skip``
    (not dequantized: a linear method holds their blocks)."""
    from llmopt.models.gguf_file import GGUFFile

    return _iter_gguf(GGUFFile(path), cfg, path, skip)


def _iter_gguf(gf: Any, cfg: ModelConfig, path: Path, skip: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    from llmopt.formats.gguf_quants import UnsupportedTensorType, dequantize

    for t in gf.tensors:
        name = gguf_to_hf_name(t.name)
        if name is None:
            if t.name.startswith("rope_freqs"):  # llama3 rope factors: recomputed from the config
                continue
            raise ModelLoadError(f"{path.name}: unknown tensor {t.name!r} for a {cfg.arch} model")
        if skip and name in skip:
            continue
        try:
            w = dequantize(t.data, t.qtype, t.torch_shape, t.name)
        except UnsupportedTensorType as e:
            raise ModelLoadError(f"{path.name}: {e}") from None
        except (ValueError, IndexError, RuntimeError) as e:
            raise ModelLoadError(f"{path.name}: tensor {t.name!r} cannot be read, the file is corrupt or "
                                 f"truncated ({e})") from None
        if cfg.arch == "llama" and t.name.split(".")[-2] in ("attn_q", "attn_k"):
            n = cfg.num_heads if ".attn_q." in t.name else cfg.num_kv_heads
            w = unpermute_qk(w, n)
        yield name, w
