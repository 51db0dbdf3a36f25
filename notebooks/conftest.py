"""nbval runs the tutorials against a REAL Twinkle server.

    pytest --nbval-lax notebooks/

When ``TWINKLE_SERVER_URL`` and ``TWINKLE_API_KEY`` are set, that server is used. Otherwise one server is
launched for the whole pytest session (``tutorial_server.start_server``: Ray Serve, ``builtin://tiny``), after
collection and before the first notebook's kernel starts, and stopped at the end. The URL, key, model and a
temp ``TWINKLE_HOME`` are put in ``os.environ``, which the kernels nbval starts inherit.

The sanitize file ``notebooks/nbval_sanitize.cfg`` is used unless ``--nbval-sanitize-with`` names another.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
_server: dict[str, Any] = {}


def _tutorial_server() -> Any:
    spec = importlib.util.spec_from_file_location("_twinkle_tutorial_server", HERE / "tutorial_server.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "nbval_sanitize_with") and not config.option.nbval_sanitize_with:
        config.option.nbval_sanitize_with = str(HERE / "nbval_sanitize.cfg")


@pytest.hookimpl(trylast=True)  # after `-m "not slow"` has deselected the notebooks: then no server
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[Any]) -> None:
    if not any(type(it).__name__ == "IPyNbCell" for it in items) or "handle" in _server:
        return
    ts = _tutorial_server()
    url, key = os.environ.get("TWINKLE_SERVER_URL"), os.environ.get("TWINKLE_API_KEY")
    if not (url and key):
        handle = ts.start_server()
        _server["handle"] = handle
        url, key = handle.url, handle.api_key
    env = ts.tutorial_env(url, key)
    _server["saved_env"] = {k: os.environ.get(k) for k in env}
    os.environ.update(env)


def pytest_unconfigure(config: pytest.Config) -> None:
    handle = _server.pop("handle", None)
    if handle is not None:
        handle.stop()
    for k, v in _server.pop("saved_env", {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
