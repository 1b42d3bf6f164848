"""llmopt: make small open LLMs fast, small and good at reasoning on ordinary CPUs."""

from llmopt.engine.sampling_params import SamplingParams
from llmopt.llm import LLM
from llmopt.models.loader import load_model
from llmopt.quant.checkpoint import register as _register_quantized_checkpoints

# The composition root: the quantized-checkpoint reader lives above the loader (quant/), so it is
# registered here rather than imported by models/.
_register_quantized_checkpoints()

__all__ = ["LLM", "SamplingParams", "load_model"]
__version__ = "0.1.0"
