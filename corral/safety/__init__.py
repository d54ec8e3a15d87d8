"""Safety: Llama Guard prompting and verdicts, the embedded guard, and (corral.safety.codeshield) insecure-code
scanning. The server plugs guards into its stream filters; nothing here imports the server."""
