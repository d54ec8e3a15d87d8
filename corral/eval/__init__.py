"""Evaluation: tasks as data (tasks.py), lm-eval's log-likelihood on any Corral model (loglik.py), metrics,
perplexity, an OpenAI-compatible server backend, and the `corral eval` commands. See docs/eval.md."""
