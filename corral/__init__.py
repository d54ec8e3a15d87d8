"""Corral: the Llama 3 system in Python."""
