"""Build a training ``Backend`` from a model config dict, importing the backend module only when needed.

``backend`` is ``transformers`` | ``megatron`` | ``mock``, or ``package.module:ClassName`` for a custom
backend (any ``twinkle.model.base.Backend`` subclass). The config's keys that name parameters of the backend's
constructor (``model_id``, ``dtype``, ``device``, ``seed``, ...) are passed to it, and ``backend_options`` (a
dict) is passed verbatim on top. Scheduler and limit keys (``max_adapters``, ``batch_token_budget``, ...) are
used by the worker, never by the backend.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from twinkle.model.base import Backend
from twinkle.types import InvalidInputError, UnsupportedError

BUILTIN_BACKENDS: dict[str, str] = {
    "mock": "twinkle.model.mock:MockBackend",
    "transformers": "twinkle.model.transformers:TransformersBackend",
    "megatron": "twinkle.model.megatron:MegatronBackend",
}

# Keys of a model config that belong to the server (placement, limits, scheduler), not to the backend.
_SERVER_KEYS = frozenset({
    "backend", "backend_options", "name", "placement", "replicas", "num_replicas", "ray_actor_options", "resources",
    "max_adapters", "max_lora_rank", "max_tokens_per_request", "lease_timeout", "scheduler", "sampler",
})


def backend_target(kind: str) -> str:
    """``module:Class`` for a backend name (validated)."""
    if not isinstance(kind, str) or not kind:
        raise InvalidInputError("backend must be a non-empty string", field="backend")
    if kind in BUILTIN_BACKENDS:
        return BUILTIN_BACKENDS[kind]
    if ":" in kind:
        return kind
    raise InvalidInputError(
        f"unknown backend {kind!r}; use one of {sorted(BUILTIN_BACKENDS)} or 'module:Class'", field="backend"
    )


def load_backend_class(kind: str) -> type[Backend]:
    target = backend_target(kind)
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UnsupportedError(
            f"backend {kind!r} is not available in this installation ({e})", field="backend"
        ) from e
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise InvalidInputError(f"{target!r} is not a twinkle Backend class", field="backend")
    return cls


def backend_kwargs(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of ``cls`` found in ``config`` (plus ``backend_options`` verbatim)."""
    params = inspect.signature(getattr(cls, "__init__")).parameters  # noqa: B009 - mypy: no __init__ access on an instance
    named = {
        n for n, p in params.items()
        if n != "self" and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    kwargs = {k: v for k, v in config.items() if k in named and k not in _SERVER_KEYS and v is not None}
    if kwargs.get("device") == "auto":
        del kwargs["device"]
    if kwargs.get("dtype") == "auto":
        del kwargs["dtype"]
    # The backend's own slot limit must fit the worker's live adapters plus its cached sampler adapters.
    if "max_adapters" in named and config.get("max_adapters") is not None:
        kwargs["max_adapters"] = int(config["max_adapters"]) + _sampler_cache_size(config) + 1
    if "max_lora_rank" in named and config.get("max_lora_rank") is not None:
        kwargs["max_lora_rank"] = int(config["max_lora_rank"])
    options = config.get("backend_options") or {}
    if not isinstance(options, dict):
        raise InvalidInputError("backend_options must be a mapping", field="backend_options")
    kwargs.update(options)
    return kwargs


def _sampler_cache_size(config: dict[str, Any]) -> int:
    from .scheduler import SchedulerConfig

    return SchedulerConfig.from_dict(config).sampler_cache_size


def build_backend(config: dict[str, Any]) -> Backend:
    """Instantiate the backend a model config names. Heavy imports (torch, megatron) happen here only."""
    if not isinstance(config, dict):
        raise InvalidInputError("a model config must be a mapping", field="models")
    if not config.get("model_id") and config.get("backend", "transformers") != "mock":
        raise InvalidInputError("a model config needs model_id", field="model_id")
    cls = load_backend_class(config.get("backend", "transformers"))
    return cls(**backend_kwargs(cls, config))
