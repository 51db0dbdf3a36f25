"""Client-side data preparation (no torch at import)."""

from .convert import IGNORE_INDEX, to_datum, to_datums

__all__ = ["IGNORE_INDEX", "to_datum", "to_datums"]
