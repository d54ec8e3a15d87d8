"""Safety in the serving path: Llama Guard moderation and Code Shield (insecure-code scanning)."""
