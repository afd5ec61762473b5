"""``phi3v serve``: an OpenAI-compatible HTTP server for a model and its LoRA adapters.

protocol.py (OpenAI's schema, request checks) -> engine.py (queue, batches, adapter switching, generation through
``phi3v.eval``) -> app.py (FastAPI routes, server-sent events, the chat page ``chat.html``). FastAPI and uvicorn
come with the ``serve`` extra: ``pip install -e ".[serve]"``.
"""

from phi3v.serve.config import ServeConfig

__all__ = ["ServeConfig"]
