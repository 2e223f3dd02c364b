"""The OpenAI-compatible server: ``create_app(settings)`` builds a FastAPI app."""

from vlmlab.server.app import create_app

__all__ = ["create_app"]
