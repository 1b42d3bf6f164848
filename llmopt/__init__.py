"""llmopt: make small open LLMs fast, small and good at reasoning on ordinary CPUs."""

from llmopt.engine.sampling_params import SamplingParams
from llmopt.llm import LLM
from llmopt.models.loader import load_model

__all__ = ["LLM", "SamplingParams", "load_model"]
__version__ = "0.1.0"
