"""Small helpers shared by the state registries and the service facade."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

from twinkle.types import InvalidInputError, TwinkleError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def now() -> float:
    return time.time()


def deferred(timer: asyncio.TimerHandle | None, delay_s: float,
             flush: Callable[[], None]) -> asyncio.TimerHandle | None:
    """Coalesce writes: the pending timer if there is one, else a new one that calls ``flush`` in ``delay_s`` on
    the running event loop; outside an event loop ``flush`` runs now (and None is returned)."""
    if timer is not None:
        return timer
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        flush()
        return None
    return loop.call_later(delay_s, flush)


def validate_checkpoint_name(name: Any, field: str = "name") -> str:
    """A checkpoint name is a single path component: letters, digits, ``. _ -``; no ``/``, ``..`` or control chars."""
    if not isinstance(name, str) or not name:
        raise InvalidInputError("a checkpoint name must be a non-empty string", field=field)
    if "/" in name or "\\" in name or ".." in name or name.startswith("."):
        raise InvalidInputError(
            f"checkpoint name {name!r} must not contain '/', '\\\\' or '..' (the server chooses the directory)",
            field=field,
        )
    if not _NAME_RE.match(name):
        raise InvalidInputError(
            f"checkpoint name {name!r} may use letters, digits, '.', '_' and '-' only (at most 128)", field=field
        )
    return name


def validate_user_name(name: str) -> str:
    if not _USER_RE.match(name or ""):
        raise InvalidInputError(
            f"user name {name!r} may use letters, digits, '.', '_' and '-' only (at most 64)", field="user"
        )
    return name


def jsonable(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return obj.item()
    return obj


def unwrap(exc: BaseException) -> BaseException:
    """Ray wraps a remote exception; give back the worker's own ``TwinkleError`` when there is one."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, TwinkleError):
        return cause
    if isinstance(exc, TwinkleError) and type(exc).__name__.startswith("RayTaskError"):
        err = type(exc).__mro__[1]
        if issubclass(err, TwinkleError):
            out = err(getattr(exc, "message", str(exc)), detail=getattr(exc, "detail", None))
            return out
    return exc


def swallow(task: asyncio.Task[Any]) -> None:
    """A done-callback that marks a task's exception as retrieved (it was reported elsewhere)."""
    if not task.cancelled():
        task.exception()
