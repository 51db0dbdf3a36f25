"""Locating the data files shipped inside the package (``twinkle/data/assets``)."""

from __future__ import annotations

from pathlib import Path

_ASSETS = Path(__file__).resolve().parent / "assets"


def assets_path(name: str = "") -> Path:
    """Path of a bundled data file (or of the assets folder when ``name`` is empty)."""
    return _ASSETS / name if name else _ASSETS
