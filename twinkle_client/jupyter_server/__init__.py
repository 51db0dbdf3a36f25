"""The Jupyter-server half of the Twinkle JupyterLab extension.

Enabled by ``etc/jupyter/jupyter_server_config.d/twinkle_client.json`` (installed with the wheel). It adds
``{base_url}twinkle/...`` routes that call the Twinkle server with the connection a kernel recorded
(:mod:`twinkle_client.jupyter_server.connection_file`) or one typed into the panel, so the browser never
holds the API key and needs no CORS. Importing this package is light; tornado/jupyter_server load only when
the Jupyter server loads the extension.
"""

from __future__ import annotations

from typing import Any

from .connection_file import Connection, forget_connection, latest_connection, record_connection

__all__ = [
    "Connection",
    "forget_connection",
    "latest_connection",
    "record_connection",
]


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "twinkle_client.jupyter_server"}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    # For `jupyter labextension develop`; the wheel installs the built files under share/jupyter/labextensions.
    return [{"src": "../labextension", "dest": "twinkle-jupyterlab"}]


def _load_jupyter_server_extension(server_app: Any) -> None:
    from .handlers import setup_handlers

    setup_handlers(server_app.web_app)
    server_app.log.info("Twinkle server extension loaded: routes under %stwinkle/", server_app.base_url)
