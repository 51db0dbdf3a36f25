"""Load the Tinker SDK's protobuf module (``tinker.proto.tinker_public_pb2``) without importing torch.

``import tinker`` runs ``tinker/__init__``, which imports the whole SDK (and torch, ~1 s and ~300 MB). The
gateway only needs the generated protobuf classes. :func:`install` registers ``tinker`` as a *lazy* package:
its submodules (``tinker.proto...``) import normally, and the real ``tinker/__init__`` runs the first time an
attribute of ``tinker`` itself is used (``tinker.ServiceClient``, ``from tinker import types``...), so code in
the same process that does use the SDK still gets all of it.

    from twinkle.server._tinker_proto import tinker_pb2
    pb = tinker_pb2()          # == tinker.proto.tinker_public_pb2, torch not imported
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

__all__ = ["install", "tinker_pb2"]

_PB2 = "tinker.proto.tinker_public_pb2"
_lock = threading.RLock()


class _LazyTinker(types.ModuleType):
    """The ``tinker`` package before its ``__init__`` ran; the first missing attribute runs it."""

    def __getattr__(self, name: str) -> Any:
        with _lock:
            if type(self) is _LazyTinker:
                self.__class__ = types.ModuleType  # type: ignore[assignment]  # from now on a plain module
                spec = self.__spec__
                try:
                    spec.loader.exec_module(self)  # type: ignore[union-attr]
                except BaseException:
                    self.__class__ = _LazyTinker
                    raise
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(f"module 'tinker' has no attribute {name!r}") from None


def install() -> bool:
    """Make ``tinker`` a lazy package unless it is already imported. Returns False if the SDK is absent."""
    with _lock:
        if "tinker" in sys.modules:
            return True
        spec = importlib.util.find_spec("tinker")
        if spec is None or spec.loader is None or not spec.submodule_search_locations:
            return False
        mod = _LazyTinker("tinker")
        mod.__spec__ = spec
        mod.__loader__ = spec.loader
        mod.__file__ = spec.origin
        mod.__path__ = list(spec.submodule_search_locations)
        mod.__package__ = "tinker"
        sys.modules["tinker"] = mod
        return True


def tinker_pb2() -> types.ModuleType:
    """``tinker.proto.tinker_public_pb2``, loaded without running ``tinker/__init__`` (no torch)."""
    mod = sys.modules.get(_PB2)
    if mod is not None:
        return mod
    if not install():
        raise ImportError("the Tinker SDK (package 'tinker') is not installed")
    return importlib.import_module(_PB2)
