"""Twinkle: self-hosted training-as-a-service for LLM adapters.

Light at import: nothing here imports torch, Ray or FastAPI. Heavy subpackages load on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "init_tinker_client", "init_twinkle_client"]


def __getattr__(name: str) -> Any:
    if name in ("init_tinker_client", "init_twinkle_client"):
        import twinkle_client

        return getattr(twinkle_client, name)
    raise AttributeError(f"module 'twinkle' has no attribute {name!r}")
