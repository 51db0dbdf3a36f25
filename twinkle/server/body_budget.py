"""How many bytes of large request bodies the gateway receives and decodes at once.

A legal body decodes into about three times its size (``tests/server/test_decode_memory.py``), so one request
is bounded by ``limits.max_request_bytes``; many at once are bounded here. A body over :data:`LARGE_BODY`
reserves its size (its ``Content-Length``, or ``max_request_bytes`` for a chunked body once it passes
:data:`LARGE_BODY`) from ``limits.max_decoding_bytes`` (default four bodies of the largest size) until its
response has been sent. One API key holds at most half of it: a tenant that sends many large bodies at once
gets 429s while the others' requests go on. A request that does not fit waits up to :data:`WAIT_S` for
others to finish, then gets a 429 with ``Retry-After`` (both clients retry it). Small bodies never wait.

A compressed body may inflate to ``max_request_bytes`` whatever its own size: the route that inflates it
reserves that much first (:meth:`BodyBudget.hold`). The Tinker SDK compresses only when ``client/config``
asks it to, which this server does not.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator

from twinkle.types import CapacityError

__all__ = ["LARGE_BODY", "WAIT_S", "BodyBudget"]

LARGE_BODY = 1 << 20
"""Bodies up to this size (1 MiB) are not counted: every ordinary request, a Tinker SDK chunk included."""

WAIT_S = 5.0
"""How long a large body waits for room before its 429."""


class BodyBudget:
    def __init__(self, total: int):
        self.total = int(total)
        self.per_key = max(1, self.total // 2)
        self.used = 0
        self.by_key: dict[str, int] = defaultdict(int)
        self._cond: asyncio.Condition | None = None

    async def acquire(self, key: str, n: int) -> None:
        """Reserve ``n`` bytes for a request of ``key`` (the caller's API key, or "" without one)."""
        if self.by_key[key] + n > self.per_key:
            raise CapacityError(f"too many large requests in flight for this API key ({self.by_key[key]} bytes "
                                f"of bodies; at most {self.per_key}: half of limits.max_decoding_bytes); "
                                "retry shortly", retry_after=1.0, field="body")
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: self.used + n <= self.total), WAIT_S)
            except TimeoutError:
                raise CapacityError(f"the server is receiving too many large requests ({self.used} bytes of "
                                    f"bodies; limits.max_decoding_bytes is {self.total}); retry shortly",
                                    retry_after=2.0, field="body") from None
            if self.by_key[key] + n > self.per_key:  # the same key took its share while this one waited
                raise CapacityError("too many large requests in flight for this API key; retry shortly",
                                    retry_after=1.0, field="body")
            self.used += n
            self.by_key[key] += n

    @contextlib.asynccontextmanager
    async def hold(self, key: str, n: int) -> AsyncIterator[None]:
        await self.acquire(key, n)
        try:
            yield
        finally:
            await self.release(key, n)

    async def release(self, key: str, n: int) -> None:
        assert self._cond is not None
        async with self._cond:
            self.used -= n
            self.by_key[key] -= n
            if self.by_key[key] <= 0:
                del self.by_key[key]
            self._cond.notify_all()
