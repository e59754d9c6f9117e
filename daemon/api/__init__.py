"""The REST API (FastAPI): inference, samples, cycles, models, status, metrics, health.

One router module per resource; every route calls the Runtime's public methods."""
from __future__ import annotations

from .app import GuardMiddleware, create_app

__all__ = ["create_app", "GuardMiddleware"]
