"""Corral: the Llama 3 system in Python.

    import corral
    llm = corral.load()                      # the embedded SmolLM2-135M-Instruct
    llm.chat([{"role": "user", "content": "What is the capital of France?"}]).text
"""

from corral.engine.engine import Completion, Engine
from corral.engine.sampling import SamplingParams
from corral.errors import CorralError, FormatError
from corral.llm import LLM, GenerationResult, load

__all__ = ["LLM", "Completion", "CorralError", "Engine", "FormatError", "GenerationResult", "SamplingParams", "load"]
