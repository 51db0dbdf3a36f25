"""Runs a ``self_host`` cookbook script against a hosted Twinkle server (e.g. one on ModelScope).

Each ``modelscope/<name>.py`` is a two-line launcher for ``../self_host/<name>.py``: the hosted variants differ
only in the server URL, the API key and the base model, all read from the environment:

* ``TWINKLE_SERVER_URL`` or ``MODELSCOPE_SERVER_URL`` (required)
* ``TWINKLE_API_KEY`` or ``MODELSCOPE_API_KEY`` (required)
* ``TWINKLE_BASE_MODEL`` or ``MODELSCOPE_MODEL`` (default ``Qwen/Qwen3-0.6B``)

Command-line ``--name=value`` flags pass through to the script unchanged.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
_SETTINGS = [("TWINKLE_SERVER_URL", "MODELSCOPE_SERVER_URL", None),
             ("TWINKLE_API_KEY", "MODELSCOPE_API_KEY", None),
             ("TWINKLE_BASE_MODEL", "MODELSCOPE_MODEL", DEFAULT_MODEL)]


def hosted_env(environ: dict[str, str]) -> dict[str, str]:
    """The ``TWINKLE_*`` settings the self_host scripts read, filled from ``environ``; exits naming a missing one."""
    out = {}
    for ours, theirs, default in _SETTINGS:
        value = environ.get(ours) or environ.get(theirs) or default
        if value is None:
            sys.exit(f"set {ours} (or {theirs})")
        out[ours] = value
    return out


def run_hosted(launcher: str) -> None:
    """Run ``../self_host/<name>.py`` (``<name>`` of the ``launcher`` file) as ``__main__`` with the hosted settings."""
    os.environ.update(hosted_env(dict(os.environ)))
    path = Path(launcher).resolve()
    runpy.run_path(str(path.parents[1] / "self_host" / path.name), run_name="__main__")


if __name__ == "__main__":
    run_hosted(globals()["SCRIPT"])  # set by the modelscope launcher
