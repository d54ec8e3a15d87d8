"""Corral: the Llama 3 system in Python.

    import corral
    llm = corral.load()                      # the embedded SmolLM2-135M-Instruct
    llm.chat([{"role": "user", "content": "What is the capital of France?"}]).text
"""

from importlib import import_module

# Imported on first use (PEP 562), so `import corral.errors` or the benchmark's llama.cpp child does
# not pay for torch; `corral.load` and friends behave as plain attributes.
_PUBLIC = {
    "LLM": "corral.llm",
    "GenerationResult": "corral.llm",
    "load": "corral.llm",
    "Engine": "corral.engine.engine",
    "Completion": "corral.engine.engine",
    "SamplingParams": "corral.engine.sampling",
    "CorralError": "corral.errors",
    "FormatError": "corral.errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'corral' has no attribute {name!r}")
