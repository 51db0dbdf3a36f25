"""Every implementation of the worker interface the service uses has all of its methods."""

from __future__ import annotations

import inspect

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
