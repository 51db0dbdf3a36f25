"""Streamed sampling: ``POST /api/v1/twinkle/sample/stream`` (server-sent events) and the shared event source.

Events (``text/event-stream``): ``event: token`` with ``{"index", "token", "logprob", "text"}`` per sampled
token (``index``: which of the ``num_samples`` sequences; ``text``: what the token added to it), then
``event: done`` with the whole ``SampleResponse`` (the same JSON ``/sample`` returns), or ``event: error``
with ``{error, category, code, detail}``. A bad request is refused with a plain 4xx before the stream starts.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from twinkle.model.images import prompt_arg
from twinkle.types import SampleResponse, TwinkleError
from twinkle.types.api import SampleStreamRequest

from .deps import CompactJSONRoute, get_service, get_user
from .ops import SampleOp
from .service import Service, User

__all__ = ["create_stream_router", "merged_polls", "open_stream", "sse"]

_POLL_S = 10.0


async def open_stream(service: Service, user: User, op: SampleOp, *, base_model: str | None = None,
                      run_id: str | None = None, checkpoint: str | None = None) -> AsyncGenerator[dict[str, Any], None]:
    """Validate and start a streamed sample request (raises a ``TwinkleError`` at once when it is refused);
    returns an iterator of ``{"events": [...], "done", "result"}`` polls. Closing it (``aclose``) before it was
    read to the end, even before its first poll, drops the request on the worker."""
    t = service.sample_target(user, op, base_model=base_model, run_id=run_id, checkpoint=checkpoint)
    if t.after is not None and not t.after.done():
        await t.after
    worker = t.worker
    sid = await worker.sample_stream_open(op, adapter_id=t.adapter_id, checkpoint_path=t.checkpoint_dir)

    async def polls() -> AsyncGenerator[dict[str, Any], None]:
        nxt = 0
        finished = False
        try:
            yield {}  # taken by open_stream: from here on, closing the generator runs the `finally` below
            while not finished:
                r = await worker.sample_stream_poll(sid, nxt, _POLL_S)
                finished = bool(r["done"])
                nxt = r["next"]
                if finished and r.get("result") is not None:  # usage metering, as for /sample
                    res = r["result"]
                    res = r["result"] = res if isinstance(res, SampleResponse) else SampleResponse.model_validate(res)
                    service.meter(user.name, t.base_model, prefilled=len(op.prompt),
                                  sampled=sum(len(q.tokens) for q in res.sequences))
                yield r
        except BaseException as e:
            finished = finished or isinstance(e, TwinkleError)  # the worker already forgot a failed stream
            raise
        finally:
            if not finished:  # the client went away (disconnect, cancellation): drop the queued work
                _close_later(worker, sid)

    gen = polls()
    await gen.__anext__()
    return gen


async def merged_polls(streams: list[AsyncGenerator[dict[str, Any], None]]
                       ) -> AsyncGenerator[tuple[int, dict[str, Any]], None]:
    """The polls of several streams (:func:`open_stream`) as they come, each with its stream's index. A failed
    stream's error is raised; closing this closes them all (the unfinished ones drop their requests)."""
    if len(streams) == 1:
        try:
            async for only in streams[0]:
                yield 0, only
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, dict[str, Any] | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncGenerator[dict[str, Any], None]) -> None:
        try:
            async for p in stream:
                queue.put_nowait((i, p, None))
            queue.put_nowait((i, None, None))
        except Exception as e:  # noqa: BLE001 - handed to the reader
            queue.put_nowait((i, None, e))

    tasks = [asyncio.create_task(pump(i, st)) for i, st in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, p, err = await queue.get()
            if err is not None:
                raise err
            if p is None:
                left -= 1
            else:
                yield i, p
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for st in streams:
            await st.aclose()


def _close_later(worker: Any, sid: str) -> None:
    """Close a stream from a task of its own: the caller is being cancelled, so it cannot await."""
    task = asyncio.ensure_future(worker.sample_stream_close(sid))
    _closing.add(task)
    task.add_done_callback(_closing.discard)


_closing: set[asyncio.Future] = set()


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def error_event(e: BaseException) -> bytes:
    if isinstance(e, TwinkleError):
        body = {"error": str(e), "category": getattr(e, "category", "server"), "code": getattr(e, "code", "error"),
                "detail": dict(getattr(e, "detail", {}) or {})}
    else:
        body = {"error": "sampling failed on the server", "category": "server", "code": "internal", "detail": {}}
    return sse("error", body)


def create_stream_router() -> APIRouter:
    r = APIRouter(prefix="/api/v1/twinkle", tags=["native"], route_class=CompactJSONRoute)
    who = Depends(get_user)
    svc = Depends(get_service)

    @r.post("/sample/stream")
    async def sample_stream(body: SampleStreamRequest, user: User = who, service: Service = svc) -> StreamingResponse:
        op = SampleOp(prompt=prompt_arg(body.prompt), num_samples=body.num_samples, params=body.sampling_params,
                      prompt_logprobs=body.prompt_logprobs, topk_prompt_logprobs=body.topk_prompt_logprobs,
                      topk_logprobs=body.topk_logprobs)
        polls = await open_stream(service, user, op, base_model=body.base_model, run_id=body.run_id,
                                  checkpoint=body.checkpoint)

        async def gen() -> AsyncIterator[bytes]:
            try:
                async for p in polls:
                    for ev in p["events"]:
                        yield sse("token", ev)
                    if p["done"]:
                        res = p["result"]
                        res = res if isinstance(res, SampleResponse) else SampleResponse.model_validate(res)
                        yield sse("done", res.model_dump(mode="json"))
            except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
                yield error_event(e)
            finally:  # also when the client disconnected mid-stream: its queued work is dropped
                await polls.aclose()

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return r
