"""Streams of sampled tokens inside a model worker, read by the gateway with long polls.

The worker opens a stream for a sample request (the scheduler calls back with ``(sample index, token,
logprob)`` triples as the continuous sampler produces them); the gateway calls ``poll(stream_id, after,
timeout)`` which returns as soon as there are events past ``after`` (or the request finished, or the
timeout passed). Each event carries the text the token added to its sequence (decoded incrementally by the
worker's tokenizer; an incomplete UTF-8 character is held back until it completes). The final poll carries
the whole ``SampleResponse``; a stream is forgotten after it was read to the end or ``ttl_s`` after its last
poll. Polling keeps this working the same in process and across Ray Serve handles.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twinkle.types import NotFoundError, SampleResponse, TwinkleError

Decode = Callable[[list[int]], str]
_WINDOW = 4  # tokens of already-sent text kept in front of each new one when decoding it


def next_piece(decode: Decode, toks: list[int], n: int, window: tuple[int, int]) -> tuple[str, tuple[int, int]]:
    """The text token ``n - 1`` of ``toks`` adds after ``toks[:n - 1]``, and the window to pass for the next one
    (start with ``(0, 0)``). Decoded over a short window of the latest tokens (``toks[prefix:n]`` against
    ``toks[prefix:read]``, the part already handed out), not the whole sequence: decoding all of it at every
    token costs O(n^2) (~1.6 s for one 4000-token stream on builtin://small's tokenizer). The window starts a
    few tokens back so that a token whose text depends on the one before it (a leading space, a character split
    over byte tokens) decodes as in the whole; an incomplete character (U+FFFD at the end) gives "" and waits for
    the token that completes it."""
    prefix, read = window
    before = decode(toks[prefix:read]) if read > prefix else ""
    text = decode(toks[prefix:n])
    if text.endswith("\ufffd"):
        return "", window
    return text[len(before):], (max(prefix, read - _WINDOW), n)


def pieces(decode: Decode, toks: list[int]) -> list[str]:
    """The text each token of ``toks`` adds, in order (they add up to ``decode(toks)``)."""
    out, window = [], (0, 0)
    for n in range(1, len(toks) + 1):
        piece, window = next_piece(decode, toks, n, window)
        out.append(piece)
    return out


@dataclass
class _Stream:
    events: list[dict[str, Any]] = field(default_factory=list)
    tokens: dict[int, list[int]] = field(default_factory=dict)
    # sample index -> (prefix, read): tokens[prefix:read] decode to the text already sent of that window
    window: dict[int, tuple[int, int]] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    result: SampleResponse | None = None
    error: TwinkleError | None = None
    done: bool = False
    future: asyncio.Future | None = None  # the sample request's future (to cancel it when the reader leaves)
    touched: float = field(default_factory=time.monotonic)


class StreamHub:
    def __init__(self, decode: Decode | None, ttl_s: float = 120.0) -> None:
        self._decode = decode
        self._streams: dict[str, _Stream] = {}
        self.ttl_s = ttl_s

    def open(self) -> tuple[str, Callable[[list[tuple[Any, ...]]], None], Callable[[asyncio.Future], None]]:
        """A new stream: its id, the ``on_tokens`` listener and the done-callback for the request's future."""
        self._expire()
        sid = "s" + uuid.uuid4().hex
        st = self._streams[sid] = _Stream()

        def on_tokens(items: list[tuple[Any, ...]]) -> None:
            """``(sample index, token, logprob)`` or ``(..., top)``: ``top`` the most likely ``(token, logprob)``
            at that position (``SampleOp.topk_logprobs``), sent as ``[token, text, logprob]`` triples."""
            for index, token, logprob, *rest in items:
                toks = st.tokens.setdefault(index, [])
                toks.append(token)
                ev = {"index": index, "token": token, "logprob": logprob, "text": self._text(st, index)}
                top = rest[0] if rest else None
                if top:
                    ev["top"] = [[t, self._decode([t]) if self._decode is not None else "", lp] for t, lp in top]
                st.events.append(ev)
            st.changed.set()

        def on_done(fut: asyncio.Future) -> None:
            st.done = True
            if fut.cancelled():
                st.error = TwinkleError("the sample request was cancelled")
            elif fut.exception() is not None:
                e = fut.exception()
                st.error = e if isinstance(e, TwinkleError) else TwinkleError(str(e))
            else:
                st.result = fut.result()
                for seq_i, seq in enumerate(st.result.sequences):  # whole-batch backends: tokens come at the end
                    have = len(st.tokens.get(seq_i, []))
                    if have < len(seq.tokens):
                        lps = list(seq.logprobs or [])[have:]  # None where the backend gave none (not 0.0)
                        lps += [None] * (len(seq.tokens) - have - len(lps))
                        on_tokens([(seq_i, t, lp) for t, lp in zip(seq.tokens[have:], lps, strict=True)])
            st.changed.set()

        return sid, on_tokens, on_done

    def attach(self, sid: str, fut: asyncio.Future) -> None:
        st = self._streams.get(sid)
        if st is not None:
            st.future = fut

    def close(self, sid: str) -> asyncio.Future | None:
        """Forget stream ``sid``; returns its request's future when the request has not finished."""
        st = self._streams.pop(sid, None) if isinstance(sid, str) else None
        if st is None or st.done or st.future is None or st.future.done():
            return None
        return st.future

    def _text(self, st: _Stream, index: int) -> str:
        """The text the newest token of sample ``index`` adds (:func:`next_piece`: on the worker's event loop,
        so never the whole sequence decoded again)."""
        if self._decode is None:
            return ""
        toks = st.tokens[index]
        piece, st.window[index] = next_piece(self._decode, toks, len(toks), st.window.get(index, (0, 0)))
        return piece

    async def poll(self, sid: str, after: int = 0, timeout: float = 10.0) -> dict[str, Any]:
        st = self._streams.get(sid) if isinstance(sid, str) else None
        if st is None:
            raise NotFoundError(f"stream {sid!r} not found", field="stream_id")
        after = max(0, int(after))
        st.touched = time.monotonic()
        if len(st.events) <= after and not st.done:
            st.changed.clear()
            try:
                await asyncio.wait_for(st.changed.wait(), timeout=max(0.0, min(float(timeout), 60.0)))
            except TimeoutError:
                pass
        events = st.events[after:]
        out: dict[str, Any] = {"events": events, "next": after + len(events), "done": st.done}
        if st.done:
            if st.error is not None:
                self._streams.pop(sid, None)
                raise st.error
            out["result"] = st.result
            self._streams.pop(sid, None)
        return out

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [k for k, v in self._streams.items() if now - v.touched > self.ttl_s]:
            del self._streams[sid]
