"""Corral vs llama.cpp vs transformers on one GGUF: `python bench/engine.py [MODEL] [--runs N] ...`.

A thin wrapper over `corral.bench.harness` (the same as `corral bench`); see bench/README.md.
"""

import sys

from corral.bench.harness import main

if __name__ == "__main__":
    sys.exit(main())
