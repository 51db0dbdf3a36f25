"""The generation engine as the backends use it (their ``sample`` runs it in-process): the public names of
``_engine`` (one-shot generation), ``_continuous`` (continuous batching) and ``_kv`` (KV-cache checks, and the
in-place growth a sampling forward appends with)."""

from __future__ import annotations

from ._continuous import ContinuousSampler
from ._engine import generate, validate_sample_items
from ._kv import append as kv_append
from ._kv import supports as kv_cache_supports_continuous

__all__ = ["ContinuousSampler", "generate", "kv_append", "kv_cache_supports_continuous", "validate_sample_items"]
