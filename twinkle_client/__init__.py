"""Twinkle's native client: train LoRA adapters on a Twinkle server from a notebook or a script.

Light install only (httpx, pydantic, numpy): this package never imports torch. ipywidgets, pandas and IPython
are used when present (imported lazily).

    import twinkle_client
    session = twinkle_client.init_twinkle_client("http://gpu-box:8000", api_key="...")
    from twinkle_client.model import TransformersModel
"""

from __future__ import annotations

import os
from typing import Any

from ._errors import ConnectionLostError
from .session import Session, connect, current_session

__all__ = [
    "ConnectionLostError",
    "Session",
    "connect",
    "current_session",
    "init_tinker_client",
    "init_twinkle_client",
    "load_ipython_extension",
    "unload_ipython_extension",
]


def init_twinkle_client(base_url: str | None = None, api_key: str | None = None, *, new: bool = False,
                        quiet: bool = False, **kwargs: Any) -> Session:
    """Connect to a Twinkle server (``base_url`` / ``api_key`` default to ``TWINKLE_SERVER_URL`` /
    ``TWINKLE_API_KEY``) and make it the session the ``twinkle_client.model`` classes use.

    In a kernel whose previous incarnation left a session on this server, that session is re-attached (its runs
    continue where they were), or — if its lease lapsed — its runs are restored from their automatic
    checkpoints; ``new=True`` opens a fresh session instead. What happened is printed (``quiet`` silences it)."""
    from .session import open_session

    url = base_url or os.environ.get("TWINKLE_SERVER_URL")
    key = api_key or os.environ.get("TWINKLE_API_KEY")
    if not url:
        raise ConnectionLostError("no server URL: pass base_url= or set TWINKLE_SERVER_URL")
    sess = open_session(url, key, new=new, **kwargs)
    if not quiet:
        print(f"twinkle: {sess.notice}")
    return sess


def init_tinker_client(*args: Any, **kwargs: Any) -> Any:
    """Patch the Tinker SDK to talk to a Twinkle server (see ``twinkle_client.tinker_patch``)."""
    from .tinker_patch import init_tinker_client as _init

    return _init(*args, **kwargs)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext twinkle_client``: registers the ``%twinkle`` magic."""
    from .magics import TwinkleMagics

    ipython.register_magics(TwinkleMagics)


def unload_ipython_extension(ipython: Any) -> None:
    pass
