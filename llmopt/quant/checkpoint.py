"""Quantized checkpoints: a directory that ``load_model`` / ``LLM(DIR)`` / ``llmopt generate --model
DIR`` load like any Hugging Face directory.

Layout of ``DIR``:

- ``model.safetensors``: float tensors under their Hugging Face names (``model.embed_tokens.weight``,
  ``model.norm.weight``, un-fused ``q_proj``/``k_proj``/``v_proj``/``gate_proj``/``up_proj`` for
  linears that stayed float, ``lm_head.weight`` unless tied), stored as ``float_dtype`` (bfloat16
  by default); every quantized linear as its packed tensors under its llmopt module name with the
  ``model.`` prefix, e.g. ``model.layers.0.self_attn.qkv_proj.qweight`` / ``.scales`` / ``.mins``
  / ``.bias`` (fp32) and ``lm_head.qweight`` for a quantized head. A quantized input embedding
  (:class:`~llmopt.quant.embedding.QuantEmbedding`) that shares a quantized tied head's packed
  tensors has no tensor of its own (the head's are stored once); an unshared one is stored as
  ``model.embed_tokens.qweight`` / ``.scales`` / ``.mins`` (and no ``model.embed_tokens.weight``).
- ``quant_config.json``: per module ``fmt``, ``group_size``, ``in_features``, ``out_features``,
  ``bias``, ``bits_per_weight``; ``format`` (the decoder linears' format, or "mixed"; a quantized
  head is reported as ``lm_head_format``); the method, average bits, llmopt version, tied embeddings,
  float dtype and the caller's ``quant_info``. Quantized embeddings are listed under ``embeddings``
  (per module ``fmt``, ``group_size``, ``num_embeddings``, ``embedding_dim``, ``bits_per_weight``,
  ``shared_with``: the checkpoint name of the head whose tensors it reads, or null), with
  ``embedding_format`` at the top level; such a checkpoint has ``format_version`` 2 (older llmopt
  refuses it by name instead of failing on a missing float table), all others 1. Its presence is
  what makes ``load_model`` delegate to :func:`load_quantized`.
- ``config.json`` (transformers' config of the model, checked to read back to the same
  ``ModelConfig``; for a GGUF source it is the config llmopt rebuilt from the GGUF metadata),
  and the tokenizer (``save_pretrained`` of the wrapped HF tokenizer: ``tokenizer.json``, its
  config and the chat template); the eos ids are written into ``config.json``.

What is loaded back is bit-identical to the in-memory model that was saved, provided its float
weights are representable in ``float_dtype`` (see :func:`round_float_weights_`, which the CLI
applies before measuring, so that the measured model is the saved model).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmopt.config import ModelConfig, ModelLoadError
from llmopt.models.linear import EmbeddingMethod, LinearMethod, QuantConfig
from llmopt.models.loader import LoadedModel, empty_model, fill_weights, open_hf_dir, register_checkpoint_format
from llmopt.models.transformer import Transformer

log = logging.getLogger(__name__)

__all__ = ["save_quantized", "load_quantized", "is_quantized_checkpoint", "round_float_weights_",
           "QUANT_CONFIG", "WEIGHTS_FILE", "FORMAT_VERSION"]

QUANT_CONFIG = "quant_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 2  # highest written / read; 1 = no quantized embedding

_ARCH_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _llmopt_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmopt")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _hf_module_name(name: str) -> str:
    """llmopt module name (``layers.0.mlp.down_proj``) -> checkpoint name (``model.layers...``)."""
    return name if name.startswith("lm_head") else f"model.{name}"


def _module_name(hf_name: str) -> str:
    return hf_name.removeprefix("model.")


def _dtype_name(dtype: torch.dtype) -> str:
    for k, v in _DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"float_dtype must be one of {', '.join(_DTYPES)}, got {dtype}")


def is_quantized_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / QUANT_CONFIG).exists()


@torch.no_grad()
def round_float_weights_(model: nn.Module, float_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Round (in place) every float parameter to ``float_dtype`` and back to its own dtype, so the
    in-memory model equals what :func:`save_quantized` with that ``float_dtype`` stores.
    Quantized linears are untouched (their packed tensors are stored exactly)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != float_dtype:
            p.copy_(p.to(float_dtype).to(p.dtype))
    return model


def _quant_modules(model: nn.Module) -> dict[str, nn.Module]:
    from .linear import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _quant_embeddings(model: nn.Module) -> dict[str, nn.Module]:
    from .embedding import QuantEmbedding

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantEmbedding)}


def _split_fused(model: nn.Module, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A float fused parameter (``layers.0.self_attn.qkv_proj.weight``) -> HF-named shards."""
    parts = name.split(".")
    if len(parts) < 2 or parts[-2] not in _FUSED:
        return [(name, tensor)]
    mod = parts[-2]
    ranges = model._shard_ranges(mod)
    return [(".".join(parts[:-2] + [hf, parts[-1]]), tensor[lo:hi])
            for hf, (lo, hi) in zip(_FUSED[mod], ranges)]


def _hf_config_for(config: ModelConfig, float_dtype: torch.dtype) -> Any:
    """The transformers config to write: the model's own (HF dir) or the one llmopt rebuilt from
    the GGUF metadata, with every field ``ModelConfig`` reads forced to the ModelConfig values."""
    from transformers import AutoConfig

    c = config
    if c.hf_config is not None:
        hf = copy.deepcopy(c.hf_config)
    else:
        hf = AutoConfig.for_model(c.arch, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    fields = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                  num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                  max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
                  bos_token_id=c.bos_token_id,
                  eos_token_id=(c.eos_token_ids[0] if len(c.eos_token_ids) == 1 else list(c.eos_token_ids) or None))
    if c.arch == "llama":
        fields["attention_bias"] = c.attention_bias
    for k, v in fields.items():
        setattr(hf, k, v)
    hf.architectures = [_ARCH_CLASS[c.arch]]
    try:
        hf.dtype = float_dtype
    except Exception:  # older transformers: torch_dtype
        pass
    return hf


def _check_config_roundtrip(out: Path, config: ModelConfig) -> None:
    from transformers import AutoConfig

    back = ModelConfig.from_hf(AutoConfig.from_pretrained(out))
    keys = ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
            "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "attention_bias",
            "o_bias", "qk_norm", "layer_windows", "bos_token_id")
    bad = [k for k in keys if getattr(back, k) != getattr(config, k)]
    if sorted(back.eos_token_ids) != sorted(config.eos_token_ids):
        bad.append("eos_token_ids")
    if bad:
        raise RuntimeError(f"the written config.json does not read back to the same model config ({', '.join(bad)})")


def save_quantized(model: nn.Module, tokenizer: Any, config: ModelConfig, out_dir: str | Path,
                   quant_info: dict[str, Any] | None = None,
                   float_dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Write ``model`` (a :class:`~llmopt.models.transformer.Transformer` whose linears are partly or
    wholly :class:`~llmopt.quant.linear.QuantLinear`) to ``out_dir`` (created if needed; files
    already there are overwritten). ``tokenizer`` is an llmopt ``Tokenizer`` (or a HF tokenizer).
    ``quant_info`` (JSON-serialisable; ``method`` is read from it, default "rtn") is stored in
    ``quant_config.json``. Returns the quant_config dict that was written."""
    from safetensors.torch import save_file

    from llmopt.formats.layouts import FORMATS

    quant_info = dict(quant_info or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qmods = _quant_modules(model)
    if not qmods:
        log.warning("save_quantized: the model has no quantized linear; writing a float checkpoint")
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    q_params = q_bits = 0.0
    bias_params = 0  # float biases of quantized linears: stored (fp32), counted as float parameters
    for name, m in qmods.items():
        if m.fmt not in FORMATS:
            raise ValueError(f"module {name} has unknown format {m.fmt!r}")
        hname = _hf_module_name(name)
        for key, t in m.packed_state().items():
            tensors[f"{hname}.{key}"] = t.detach().to("cpu").contiguous()
        bpw = float(m.bits_per_weight)
        modules[hname] = {"fmt": m.fmt, "group_size": int(m.group_size), "in_features": int(m.in_features),
                          "out_features": int(m.out_features), "bias": m.bias is not None,
                          "bits_per_weight": round(bpw, 6)}
        n = m.in_features * m.out_features
        q_params += n
        q_bits += bpw * n
        bias_params += m.bias.numel() if m.bias is not None else 0
    # quantized embeddings: a table shared with a quantized head of this model is stored once (as the
    # head, already counted above); any other is stored and counted as its own packed tensors
    head_names = {id(m): n for n, m in qmods.items()}
    embeddings: dict[str, dict[str, Any]] = {}
    for name, e in _quant_embeddings(model).items():
        if e.fmt not in FORMATS:
            raise ValueError(f"embedding {name} has unknown format {e.fmt!r}")
        hname = _hf_module_name(name)
        shared = head_names.get(id(e.source)) if e.tied else None
        bpw = float(e.bits_per_weight)
        embeddings[hname] = {"fmt": e.fmt, "group_size": int(e.group_size), "num_embeddings": int(e.num_embeddings),
                             "embedding_dim": int(e.embedding_dim), "bits_per_weight": round(bpw, 6),
                             "shared_with": _hf_module_name(shared) if shared is not None else None}
        if shared is None:
            for key, t in e.packed_state().items():
                tensors[f"{hname}.{key}"] = t.detach().to("cpu").contiguous()
            n = e.num_embeddings * e.embedding_dim
            q_params += n
            q_bits += bpw * n
    tied = bool(config.tie_word_embeddings)
    lm_head_tied = tied and "lm_head" not in qmods
    float_params = bias_params
    for pname, p in model.named_parameters():  # shared (tied) parameters appear once
        if pname == "lm_head.weight" and tied:
            continue
        for hname, t in _split_fused(model, pname, p.detach()):
            tensors[_hf_module_name(hname)] = t.to("cpu", float_dtype).contiguous()
        float_params += p.numel()
    # config + tokenizer first, weights, then quant_config.json last: a directory without it is never
    # mistaken for a complete quantized checkpoint
    hf = _hf_config_for(config, float_dtype)
    hf.save_pretrained(out)
    _check_config_roundtrip(out, config)
    hf_tok = getattr(tokenizer, "hf", tokenizer)
    hf_tok.save_pretrained(out)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "llmopt_quant": str(FORMAT_VERSION)})
    weights_bytes = (out / WEIGHTS_FILE).stat().st_size
    total_params = q_params + float_params
    body = sorted({v["fmt"] for k, v in modules.items() if k != "lm_head"})  # a separate head format is
    fmts = body or sorted({v["fmt"] for v in modules.values()})          # not "mixed" precision
    emb = embeddings.get("model.embed_tokens")
    qc = {
        "quant_method": "llmopt",
        "format_version": 2 if embeddings else 1,
        "llmopt_version": _llmopt_version(),
        "method": quant_info.get("method", "rtn"),
        "format": fmts[0] if len(fmts) == 1 else ("mixed" if fmts else "float"),
        "avg_bits_per_weight": round(q_bits / q_params, 6) if q_params else None,  # quantized linears + tables
        "avg_bits_all_params": round(8.0 * weights_bytes / total_params, 6) if total_params else None,
        "quantized_params": int(q_params),
        "total_params": int(total_params),
        "weights_bytes": int(weights_bytes),
        "lm_head_format": modules["lm_head"]["fmt"] if "lm_head" in modules else None,
        "embedding_format": emb["fmt"] if emb else None,
        "embedding_shared_with_lm_head": bool(emb and emb["shared_with"] == "lm_head"),
        "float_dtype": _dtype_name(float_dtype),
        "tie_word_embeddings": tied,
        "lm_head_tied_to_embeddings": lm_head_tied,
        "modules": modules,
        "embeddings": embeddings,
        "quant_info": quant_info,
    }
    (out / QUANT_CONFIG).write_text(json.dumps(qc, indent=2) + "\n", encoding="utf-8")
    return qc


# ---- loading ------------------------------------------------------------------------------------
_ROW_SHAPES: dict[tuple[str, int, int], dict[str, tuple[tuple[int, ...], torch.dtype]]] = {}


def _expected_packed(fmt: str, k: int, group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes (dim 0 = out_features, given as 1) and dtypes of the packed tensors of a [*, k] weight,
    taken from the real packer on one zero row."""
    key = (fmt, k, group_size)
    if key not in _ROW_SHAPES:
        from llmopt.formats.layouts import quantize

        qw = quantize(torch.zeros(1, k), fmt, group_size, search=False)
        if qw.group_size != group_size:
            raise ValueError(f"group_size {group_size} is not what {fmt} uses for in_features={k} ({qw.group_size})")
        _ROW_SHAPES[key] = {n: (tuple(t.shape), t.dtype) for n, t in qw.tensors.items()}
    return _ROW_SHAPES[key]


def _read_quant_config(path: Path) -> dict[str, Any]:
    f = path / QUANT_CONFIG
    try:
        qc = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{f} is not readable JSON ({e}); re-run `llmopt quantize`") from None
    if not isinstance(qc, dict) or not isinstance(qc.get("modules"), dict):
        raise ModelLoadError(f"{f} has no 'modules' table: it is not an llmopt quantized checkpoint")
    ver = qc.get("format_version", 1)
    if not isinstance(ver, int) or ver > FORMAT_VERSION:
        raise ModelLoadError(f"{f} has format_version {ver!r}; this llmopt reads up to {FORMAT_VERSION}: "
                             "upgrade llmopt")
    return qc


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32,
                   max_positions: int | None = None, quant_config: QuantConfig | None = None) -> LoadedModel:
    """Load a directory written by :func:`save_quantized`; returns a ``LoadedModel`` exactly like
    :func:`llmopt.models.loader.load_model`. Errors are ``ModelLoadError`` naming the problem.

    The model is built once in its final form: every stored quantized module gets a
    :class:`CheckpointMethod` that creates its :class:`QuantLinear` / :class:`QuantEmbedding` with
    the stored shapes and hands it the stored tensors after loading; everything else takes
    ``quant_config``'s methods (the caller's, e.g. fp32 packing in the engine; default float)."""
    from safetensors import SafetensorError, safe_open

    from llmopt.formats.layouts import FORMATS

    from .embedding import ROW_PACKED_FORMATS, QuantEmbedding
    from .linear import QuantLinear

    t0 = time.perf_counter()
    path = Path(path)
    qc = _read_quant_config(path)
    wfile = path / WEIGHTS_FILE
    if not wfile.exists():
        raise ModelLoadError(f"{path} has {QUANT_CONFIG} but no {WEIGHTS_FILE}: the checkpoint is incomplete, "
                             "re-run `llmopt quantize`")
    cfg, tok, _ = open_hf_dir(path)  # weights are read below
    with torch.device("meta"):  # the float model's shapes, to check quant_config.json against
        net = Transformer(cfg, max_positions=1)

    try:
        st = safe_open(str(wfile), framework="pt")
        keys = set(st.keys())
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{wfile.name} is not a readable safetensors file: {e}") from None

    where = f"{path.name}/{QUANT_CONFIG}"
    built: dict[str, QuantLinear] = {}  # llmopt module name -> its module, as stored
    built_emb: dict[str, tuple[str | None, QuantEmbedding | None]] = {}  # name -> (shared head, own table)
    packed_keys: set[str] = set()

    def read_packed(hname: str, fmt: str, n: int, k: int, gs: int) -> dict[str, torch.Tensor]:
        try:
            expected = _expected_packed(fmt, k, gs)
        except ValueError as e:
            raise ModelLoadError(f"{where}: module {hname!r}: {e}") from None
        t: dict[str, torch.Tensor] = {}
        for key, (row_shape, tdtype) in expected.items():
            full = f"{hname}.{key}"
            if full not in keys:
                raise ModelLoadError(f"{wfile.name} lacks tensor {full!r} that {QUANT_CONFIG} needs: "
                                     "the checkpoint is incomplete, re-run `llmopt quantize`")
            x = st.get_tensor(full)
            want = (n, *row_shape[1:])
            if tuple(x.shape) != want or x.dtype != tdtype:
                raise ModelLoadError(f"{wfile.name}: tensor {full!r} is {tuple(x.shape)} {x.dtype}, a {fmt} "
                                     f"[{n}, {k}] group {gs} weight needs {want} {tdtype}")
            t[key] = x
            packed_keys.add(full)
        return t

    def replaced(hname: str, spec: dict[str, Any], kind: str, cls: type[nn.Module], is_a: str, in_model: str,
                 dims: tuple[str, str], needs: str) -> tuple[str, int, int, int]:
        """Check the ``kind`` entry ``hname`` of ``quant_config.json`` against the module it replaces:
        it exists in ``net`` (``in_model`` describes the model), is ``is_a`` (a ``cls``) and has the
        ``[rows, cols]`` shape that ``spec`` gives under the keys ``dims``, which are also the attributes
        of ``cls`` holding it (``needs`` lists them for the error). Returns the llmopt module name, the
        group size, rows and cols."""
        name = _module_name(hname)
        try:
            old = net.get_submodule(name)
        except AttributeError:
            raise ModelLoadError(f"{where}: {kind} {hname!r} does not exist in {in_model}") from None
        if not isinstance(old, cls):
            raise ModelLoadError(f"{where}: module {hname!r} is not {is_a}")
        try:
            gs, n, k = int(spec["group_size"]), int(spec[dims[0]]), int(spec[dims[1]])
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{where}: {kind} {hname!r} needs integer group_size, {needs}") from None
        want = (getattr(old, dims[0]), getattr(old, dims[1]))
        if (n, k) != want:
            raise ModelLoadError(f"{where}: {kind} {hname!r} is [{n}, {k}] but the model (config.json) has "
                                 f"[{want[0]}, {want[1]}]: config and weights do not match")
        return name, gs, n, k

    for hname, spec in qc["modules"].items():
        if not isinstance(spec, dict):
            raise ModelLoadError(f"{where}: entry {hname!r} is not an object")
        fmt = spec.get("fmt")
        if fmt not in FORMATS:
            raise ModelLoadError(f"{where}: module {hname!r} has unknown format {fmt!r} (known: "
                                 f"{', '.join(sorted(FORMATS))}); the checkpoint needs a newer llmopt or is corrupt")
        name, gs, n, k = replaced(hname, spec, "module", nn.Linear, "a linear layer",
                                  f"a {cfg.arch} model with {cfg.num_layers} layers",
                                  ("out_features", "in_features"), "in_features and out_features")
        t = read_packed(hname, fmt, n, k, gs)
        bias = None
        if spec.get("bias") or f"{hname}.bias" in keys:
            full = f"{hname}.bias"
            if full not in keys:
                raise ModelLoadError(f"{wfile.name} lacks tensor {full!r}: the checkpoint is incomplete")
            bias = st.get_tensor(full).float()
            if tuple(bias.shape) != (n,):
                raise ModelLoadError(f"{wfile.name}: tensor {full!r} is {tuple(bias.shape)}, expected ({n},)")
            packed_keys.add(full)
        built[name] = QuantLinear.from_packed(fmt, gs, k, n, t, bias)

    # quantized embeddings (format_version 2; absent from older checkpoints: the table is float)
    embeddings = qc.get("embeddings") or {}
    if not isinstance(embeddings, dict):
        raise ModelLoadError(f"{where}: 'embeddings' is not an object")
    for hname, spec in embeddings.items():
        if not isinstance(spec, dict):
            raise ModelLoadError(f"{where}: embedding {hname!r} is not an object")
        fmt = spec.get("fmt")
        if fmt not in ROW_PACKED_FORMATS:
            raise ModelLoadError(f"{where}: embedding {hname!r} has format {fmt!r}, which this llmopt cannot hold as "
                                 f"an embedding (known: {', '.join(ROW_PACKED_FORMATS)})")
        name, gs, n, k = replaced(hname, spec, "embedding", nn.Embedding, "an embedding", f"a {cfg.arch} model",
                                  ("num_embeddings", "embedding_dim"), "num_embeddings and embedding_dim")
        shared = spec.get("shared_with")
        if shared:
            head = built.get(_module_name(shared)) if shared in qc["modules"] else None
            if not isinstance(head, QuantLinear):
                raise ModelLoadError(f"{where}: embedding {hname!r} shares the tensors of {shared!r}, which is not a "
                                     "quantized linear of this checkpoint")
            if (head.fmt, head.group_size, head.out_features, head.in_features) != (fmt, gs, n, k):
                raise ModelLoadError(f"{where}: embedding {hname!r} ({fmt}, group {gs}, [{n}, {k}]) does not match "
                                     f"the {shared!r} it shares ({head.fmt}, group {head.group_size}, "
                                     f"[{head.out_features}, {head.in_features}])")
            built_emb[name] = (_module_name(shared), None)
        else:
            try:
                built_emb[name] = (None, QuantEmbedding.from_packed(fmt, gs, n, k, read_packed(hname, fmt, n, k, gs)))
            except ValueError as e:
                raise ModelLoadError(f"{where}: embedding {hname!r}: {e}") from None

    def floats():
        for key in sorted(keys - packed_keys):
            yield key, st.get_tensor(key).float()

    base = quant_config or QuantConfig()
    method = CheckpointMethod(built)
    modules = dict(base.modules)
    modules.update({name: method for name in built})
    emb_method = base.embedding
    if "embed_tokens" in built_emb:
        shared_name = built_emb["embed_tokens"][0]
        if shared_name is not None and shared_name != "lm_head":
            raise ModelLoadError(f"{where}: the embedding shares the tensors of {shared_name!r}; only the lm_head "
                                 "can be shared")
        emb_method = CheckpointEmbeddingMethod(*built_emb["embed_tokens"])
    elif built_emb:
        raise ModelLoadError(f"{where}: quantized embeddings {sorted(built_emb)} are not the model's embed_tokens")
    net = empty_model(cfg, max_positions, QuantConfig(default=base.default, lm_head=base.lm_head, modules=modules,
                                                      embedding=emb_method))
    fill_weights(net, floats(), dtype, wfile.name)
    if dtype != torch.float32:  # a quantized embedding returns rows in the model's dtype
        net.embed_tokens.to(dtype)
    secs = time.perf_counter() - t0
    log.info("loaded quantized %s (%s, %d quantized linears) in %.2f s", path, qc.get("format"),
             len(qc["modules"]), secs)
    return LoadedModel(net, tok, cfg, path, secs)


class CheckpointMethod(LinearMethod):
    """The quantized modules of an ``llmopt quantize`` checkpoint, as stored (``modules``: llmopt
    module name -> the ``QuantLinear`` read and checked from the file, complete: nothing to convert).
    The model's meta build holds an empty slot in their place (a meta build followed by ``to_empty``
    would wipe real tensors) and takes them after the float weights are in."""

    name = "checkpoint"

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules

    def create(self, in_features: int, out_features: int, bias: bool, name: str) -> nn.Module:
        return _Slot(name)  # holds no tensor: the meta build and to_empty must not touch the stored ones

    def process_after_loading(self, module: nn.Module, name: str) -> nn.Module:
        return self.modules[name]


class CheckpointEmbeddingMethod(EmbeddingMethod):
    """A stored quantized embedding: its own packed table, or the packed tensors of the quantized head
    ``shared`` (llmopt module name, ``lm_head``)."""

    name = "checkpoint"

    def __init__(self, shared: str | None, own: nn.Module | None):
        self.shared, self.own = shared, own

    def create(self, num_embeddings: int, embedding_dim: int) -> nn.Module:
        return _Slot("embed_tokens")

    def process_after_loading(self, module: nn.Module, lm_head: nn.Module, tied: bool) -> nn.Module:
        from .embedding import QuantEmbedding

        if self.own is not None:
            return self.own
        return QuantEmbedding.tied_to(lm_head)


class _Slot(nn.Module):
    """Place of a module that a method provides after loading (holds nothing, runs nothing)."""

    def __init__(self, name: str):
        super().__init__()
        self.slot = name

    def forward(self, *args):
        raise RuntimeError(f"{self.slot}: the model was used before Transformer.process_weights_after_loading")


def register() -> None:
    """Teach ``llmopt.models.loader.load_model`` to read these directories (``llmopt/__init__``
    calls this, so every entry point that imports llmopt can load a quantized checkpoint)."""
    register_checkpoint_format("llmopt-quantized", is_quantized_checkpoint, load_quantized)
