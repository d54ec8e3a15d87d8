"""`corral bench`: Corral against llama.cpp and transformers (bench/README.md).

harness.py is the parent (prompts, medians, the table); runtimes.py the child process that runs one
runtime. This file imports nothing: a child's import time and RSS are measured from a bare start.
"""
