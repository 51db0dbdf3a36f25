"""Remote futures: one long-poll ``GET futures/{id}`` per wait; the server answers the moment it is done.

A blocking call (``forward_backward()``, ``clip_grad_and_step()``, ...) submits with ``?wait=SUBMIT_WAIT_S``: the
server holds the submit's reply until the result exists (up to that long) and puts the finished state in it, so
the call is one HTTP round trip instead of submit + poll."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Generator
from typing import Any, Generic, Protocol, TypeVar

from twinkle.types import TwinkleError
from twinkle.types.api import FutureRef, FutureState

from ._transport import HTTP, AsyncHTTP

T = TypeVar("T")
_POLL_S = 30.0
SUBMIT_WAIT_S = 30.0
"""How long a blocking call asks the server to hold the submit for its result (``?wait=``)."""


class HasHTTP(Protocol):
    """What a future needs of its session (``twinkle_client.Session`` is one): the HTTP clients to poll with (a
    protocol, so that this module does not import the session that imports it)."""

    http: HTTP

    @property
    def ahttp(self) -> AsyncHTTP: ...


class RemoteFuture(Generic[T]):
    """A server-side computation. ``result()`` blocks (long-polling) and returns the parsed value; ``await fut``
    does the same without blocking the event loop."""

    def __init__(self, session: HasHTTP, ref: FutureRef, parse: Callable[[Any], T], kind: str = "", *,
                 submitted: float | None = None):
        self.session = session
        self.ref = ref
        self.kind = kind
        self.submitted = time.monotonic() if submitted is None else submitted
        self.timing: dict[str, Any] | None = None
        """Once done: ``{kind, queue_s, exec_s, server_s, round_trip_s}`` (seconds; the server's part is None
        when it did not report it): queue wait and execution on the worker, the gateway's total, and this
        client's submit -> result."""
        self._parse = parse
        self._done = False
        self._value: T | None = None
        self._error: TwinkleError | None = None

    @property
    def future_id(self) -> str:
        return self.ref.future_id

    def done(self) -> bool:
        if not self._done:
            self._poll(0.0)
        return self._done

    def result(self, timeout: float | None = None) -> T:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done:
            wait = _POLL_S if deadline is None else max(0.0, min(_POLL_S, deadline - time.monotonic()))
            self._poll(wait)
            if not self._done and deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"future {self.future_id} ({self.kind}) not done after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    async def result_async(self, timeout: float | None = None) -> T:
        """``result()`` without blocking the event loop (long-polls with the session's async client)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done:
            wait = _POLL_S if deadline is None else max(0.0, min(_POLL_S, deadline - time.monotonic()))
            body = await self.session.ahttp.get(
                f"futures/{self.future_id}", params={"timeout": round(wait, 3)}, timeout=wait + 30.0
            )
            self._settle(FutureState.model_validate(body))
            if not self._done and deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"future {self.future_id} ({self.kind}) not done after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def __await__(self) -> Generator[Any, None, T]:
        """``await future``: the parsed result, without blocking the event loop."""
        return self.result_async().__await__()

    def _poll(self, wait: float) -> None:
        body = self.session.http.get(
            f"futures/{self.future_id}", params={"timeout": round(wait, 3)}, timeout=wait + 30.0
        )
        self._settle(FutureState.model_validate(body))

    def _settle(self, state: FutureState) -> None:
        """Take a (finished) state from a poll or from the submit's reply; a pending state changes nothing."""
        if state.status == "pending" or self._done:
            return
        if state.status == "failed":
            self._error = TwinkleError.from_dict(state.error or {"error": "the request failed"})
        else:
            self._value = self._parse(state.result)
        self._done = True
        self._record_timing(state)

    def _record_timing(self, state: FutureState) -> None:
        t = state.timing
        self.timing = {
            "kind": self.kind or state.type or "", "queue_s": t.queue_s if t else None,
            "exec_s": t.exec_s if t else None, "server_s": t.server_s if t else None,
            "round_trip_s": max(0.0, time.monotonic() - self.submitted),
        }
        latency = getattr(self.session, "latency", None)
        if latency is not None and state.status == "complete":
            latency.append(self.timing)

    def __repr__(self) -> str:
        return f"RemoteFuture({self.kind or 'request'}, id={self.future_id!r}, done={self._done})"


class PostedFuture(Generic[T]):
    """A :class:`RemoteFuture` whose submit is still being POSTed on a session's background thread
    (``Sampler.sample_async``: many requests reach the server together instead of one round trip after another).
    It behaves as the ``RemoteFuture`` the POST returns: ``result()`` / ``await`` / ``done()``; an error of the
    POST itself (a 4xx, the server down) is raised by ``result()``."""

    def __init__(self, posting: concurrent.futures.Future[RemoteFuture[T]], kind: str = ""):
        self._posting = posting
        self.kind = kind

    def remote(self, timeout: float | None = None) -> RemoteFuture[T]:
        """The server-side future, once the POST returned (raises what the POST raised)."""
        return self._posting.result(timeout)

    @property
    def future_id(self) -> str:
        return self.remote().future_id

    @property
    def ref(self) -> FutureRef:
        return self.remote().ref

    @property
    def timing(self) -> dict[str, Any] | None:
        return self.remote().timing if self._posting.done() and not self._posting.exception() else None

    def done(self) -> bool:
        if not self._posting.done():
            return False
        return self._posting.exception() is not None or self.remote().done()

    def result(self, timeout: float | None = None) -> T:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            fut = self.remote(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"{self.kind or 'request'} not submitted after {timeout} s") from None
        return fut.result(None if deadline is None else max(0.0, deadline - time.monotonic()))

    async def result_async(self, timeout: float | None = None) -> T:
        fut = await asyncio.wrap_future(self._posting)
        return await fut.result_async(timeout)

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()

    def __repr__(self) -> str:
        if not self._posting.done():
            return f"PostedFuture({self.kind or 'request'}, posting)"
        if self._posting.exception() is not None:
            return f"PostedFuture({self.kind or 'request'}, failed: {self._posting.exception()})"
        return repr(self.remote())
