"""Every implementation of the worker interface the gateway uses has all of its methods (mypy checks their
signatures: ``_conforms`` in ``worker.py`` and ``app.py``)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from twinkle.server.app import _HandleWorker
from twinkle.server.worker import ModelWorker
from twinkle.server.worker_api import WorkerAPI

_METHODS = [n for n, _ in inspect.getmembers(WorkerAPI, inspect.iscoroutinefunction) if not n.startswith("_")]


def test_protocol_lists_the_methods_the_service_calls() -> None:
    assert {"create_adapter", "remove_adapter", "execute", "skip", "sample", "has_adapter", "status",
            "model_info"} <= set(_METHODS)


def test_model_worker_and_ray_adaptor_implement_it() -> None:
    for impl in (ModelWorker, _HandleWorker):
        missing = [n for n in _METHODS if not inspect.iscoroutinefunction(getattr(impl, n, None))]
        assert not missing, f"{impl.__name__} lacks {missing}"
    assert isinstance(_HandleWorker(object()), WorkerAPI)


def test_ray_worker_deployment_answers_every_call_of_the_adaptor() -> None:
    """The Ray Serve worker deployment (built inside ``build_serve_app``; read from the source, so that the test
    needs no Ray) has a method for each name the handle adaptor calls: a missing one fails only on a real
    server with a separate worker deployment (it did for streaming and tokenize)."""
    import twinkle.server.app as app

    tree = ast.parse(Path(app.__file__).read_text())
    classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}

    def methods(cls: ast.ClassDef) -> set[str]:
        return {f.name for f in cls.body if isinstance(f, ast.AsyncFunctionDef)}

    called = {c.args[0].value for c in ast.walk(classes["_HandleWorker"]) if isinstance(c, ast.Call)
              and getattr(c.func, "attr", None) == "_call" and isinstance(c.args[0], ast.Constant)}
    assert set(_METHODS) <= called
    missing = called - methods(classes["WorkerDeployment"])
    assert not missing, f"WorkerDeployment lacks {sorted(missing)}"


def test_ray_adaptor_cancels_the_replica_call_when_its_caller_gives_up() -> None:
    import asyncio

    class Response:
        def __init__(self) -> None:
            self.cancelled = False
            self._never = asyncio.get_running_loop().create_future()

        def __await__(self):
            return self._never.__await__()

        def cancel(self) -> None:
            self.cancelled = True

    class Method:
        def __init__(self) -> None:
            self.responses: list[Response] = []

        def remote(self, *a, **kw) -> Response:
            self.responses.append(Response())
            return self.responses[-1]

    class Handle:
        sample = Method()

    async def go() -> None:
        h = Handle()
        task = asyncio.get_running_loop().create_task(_HandleWorker(h).sample(object()))
        await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        assert h.sample.responses[0].cancelled

    asyncio.run(go())
