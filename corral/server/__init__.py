"""HTTP <-> engine: the OpenAI and Ollama dialects, the chat page, one model pool.

    from corral.server.app import build_app
    from corral.server.state import ServeConfig, ServerState

`corral serve` (corral/server/commands.py) wires them and runs uvicorn; docs/server.md has the rest.
"""
