"""Safety in the serving path: Llama Guard prompting and verdicts, the embedded guard, and Code Shield
(insecure-code scanning). The server plugs both into its stream filters; nothing here imports the server."""
