"""A session is a lease on the server, held by a background heartbeat — like a remote kernel.

``connect(url, api_key)`` opens one (or re-attaches with ``session_id=``); ``Session.resume()`` re-attaches
from the local state file after a kernel restart; ``close()`` (or leaving a ``with`` block) checkpoints and
frees the session's adapters on the server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import html
import os
import socket
import threading
import time
from collections import deque
from typing import Any, Literal, overload

import httpx

from twinkle.types import GoneError, TwinkleError
from twinkle.types.api import (
    Capabilities,
    CheckpointInfo,
    CheckpointList,
    FutureRef,
    MetricHistory,
    RunInfo,
    RunList,
    ServerStatus,
    SessionInfo,
)

from . import _frames, _reattach, _state
from ._errors import ConnectionLostError, check_unexpanded
from ._futures import SUBMIT_WAIT_S, PostedFuture, RemoteFuture
from ._transport import HTTP, AsyncHTTP

__all__ = ["AsyncSession", "Session", "connect", "current_session", "open_session", "restore_runs"]

_LATENCY_KEPT = 2000  # finished requests whose timing a session remembers (LiveCurve reads them)
_POST_THREADS = 8  # background submits in flight at once (submit_in_background)
_current: Session | None = None
_current_lock = threading.Lock()


@overload
def current_session(required: Literal[True] = True) -> Session: ...


@overload
def current_session(required: bool) -> Session | None: ...


def current_session(required: bool = True) -> Session | None:
    """The session opened last by ``connect`` / ``init_twinkle_client`` in this process."""
    if _current is None or _current.closed:
        if required:
            raise ConnectionLostError(
                "not connected: call twinkle_client.init_twinkle_client(url, api_key), "
                "twinkle_client.connect(url, api_key) or `%twinkle connect URL` first"
            )
        return None
    return _current


def _set_current(session: Session | None) -> None:
    global _current
    with _current_lock:
        _current = session


class Session:
    """One client session. Do not build directly: use ``connect`` or ``Session.resume``."""

    def __init__(self, http: HTTP, info: SessionInfo, *, heartbeat: bool = True, persist_state: bool = True):
        self.http = http
        self.info = info
        self.state = "connected"  # connected | reconnecting | expired | closed
        self.last_error: str | None = None
        self.heartbeats = 0
        self._ahttp: tuple[Any, AsyncHTTP] | None = None  # (event loop, its async client)
        self.notice = ""  # what connecting did (re-attached, restored runs, ...), one line
        self.restored: list[RunInfo] = []
        self._caps: Capabilities | None = None
        self._stop = threading.Event()
        self.stop_requested = threading.Event()  # set from a training reply: someone pressed Stop (see _stop.py)
        # Where each finished request's time went ({kind, queue_s, exec_s, server_s, round_trip_s}, newest last);
        # LiveCurve shows a step's latency split from it.
        self.latency: deque[dict[str, Any]] = deque(maxlen=_LATENCY_KEPT)
        self._thread: threading.Thread | None = None
        # submits POSTed on background threads (submit_in_background) and not yet answered; every other submit
        # waits for them first, so the server sees requests in the order the program made them
        self._posts: concurrent.futures.ThreadPoolExecutor | None = None
        self._posting: set[concurrent.futures.Future[Any]] = set()
        self._posting_lock = threading.Lock()
        self.run_state = _state.SessionState(info.session_id, persist=persist_state)
        self._persist = persist_state
        http.on_connection_change = self._on_connection
        if heartbeat:
            self._thread = threading.Thread(target=self._heartbeat_loop, name="twinkle-heartbeat", daemon=True)
            self._thread.start()

    # ---- identity -------------------------------------------------------------------------------------------
    @property
    def session_id(self) -> str:
        return self.info.session_id

    @property
    def url(self) -> str:
        return self.http.base_url

    @property
    def api_key(self) -> str | None:
        return self.http.api_key

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    @property
    def heartbeat_interval(self) -> float:
        return min(30.0, max(0.2, self.info.lease_seconds / 3.0))

    # ---- lifecycle ------------------------------------------------------------------------------------------
    @classmethod
    def resume(
        cls, api_key: str | None = None, *, url: str | None = None, session_id: str | None = None,
        state_file: str | os.PathLike[str] | None = None, quiet: bool = False, **kw: Any,
    ) -> Session:
        """Re-attach to the session recorded in the local state file (after a kernel restart). When its lease
        has lapsed, a new session is opened and its runs are restored from their automatic checkpoints (with
        the optimizer state) in this same call; ``session.notice`` (printed unless ``quiet``) says so."""
        saved = _state.read_connection(state_file) or {}
        url = url or saved.get("url")
        session_id = session_id or saved.get("session_id")
        if not url or not session_id:
            where = state_file or (_state.twinkle_home() / "connection.json")
            raise ConnectionLostError(f"no saved Twinkle session to resume in {where}")
        sess = open_session(url, api_key or saved.get("api_key"), session_id=session_id, **kw)
        if not quiet:
            print(sess.notice)
        return sess

    def heartbeat(self) -> SessionInfo:
        """Extend the lease now (the background thread does this every lease/3 seconds)."""
        body = self.http.post(f"sessions/{self.session_id}/heartbeat", retry=False)
        self.info = SessionInfo.model_validate(body)
        self.heartbeats += 1
        return self.info

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval if self.state == "connected" else 0.5):
            try:
                self.heartbeat()
                if self.state == "reconnecting":
                    self.state = "connected"
                self.last_error = None
            except GoneError as e:
                self.state = "expired"
                self.last_error = str(e)
                return
            except TwinkleError as e:
                self.last_error = str(e)
                if isinstance(e, ConnectionLostError):
                    self.state = "reconnecting"
            except Exception as e:  # keep the thread alive whatever happens
                self.last_error = f"{type(e).__name__}: {e}"

    def _on_connection(self, ok: bool) -> None:
        if self.state in ("closed", "expired"):
            return
        self.state = "connected" if ok else "reconnecting"

    def close(self) -> SessionInfo | None:
        """Close the session on the server (its adapters are checkpointed and unloaded) and stop heart-beating."""
        if self.closed:
            return self.info
        self.wait_posted()
        self._stop.set()
        info = None
        try:
            if self.state != "expired":
                info = SessionInfo.model_validate(
                    self.http.post(f"sessions/{self.session_id}/close", retry_seconds=5.0)
                )
                self.info = info
        except (GoneError, ConnectionLostError):
            pass
        finally:
            self.state = "closed"
            if self._persist:
                _state.clear_connection(self.session_id)
            if _current is self:
                _set_current(None)
            self.http.close()
            self._stop_posting()
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join(timeout=2.0)
        return info

    def detach(self) -> None:
        """Stop heart-beating and drop the connection WITHOUT closing the session (it can be re-attached)."""
        self._stop.set()
        self.state = "closed"
        if _current is self:
            _set_current(None)
        self.http.close()
        self._stop_posting()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- stopping a loop (see twinkle_client/_stop.py) -------------------------------------------------------
    def request_stop(self) -> SessionInfo:
        """Ask this session's training loop to stop at its next step boundary (works from any process)."""
        return SessionInfo.model_validate(self.http.post(f"sessions/{self.session_id}/stop"))

    def clear_stop(self) -> None:
        """Forget a stop request (called once the loop stopped, and when a new loop starts)."""
        self.stop_requested.clear()
        try:
            self.http.delete(f"sessions/{self.session_id}/stop", retry_seconds=5.0)
        except TwinkleError:
            pass

    # ---- server queries -----------------------------------------------------------------------------------
    def capabilities(self, refresh: bool = False) -> Capabilities:
        if self._caps is None or refresh:
            self._caps = Capabilities.model_validate(self.http.get("capabilities"))
        return self._caps

    def server_status(self) -> ServerStatus:
        return ServerStatus.model_validate(self.http.get("status"))

    def refresh(self) -> SessionInfo:
        self.info = SessionInfo.model_validate(self.http.get(f"sessions/{self.session_id}"))
        return self.info

    def runs(self, *, all_sessions: bool = True, limit: int = 100) -> list[RunInfo]:
        """The caller's training runs (all sessions by default; ``all_sessions=False``: this one only)."""
        out = RunList.model_validate(self.http.get("runs", params={"limit": limit, "offset": 0})).runs
        return out if all_sessions else [r for r in out if r.session_id == self.session_id]

    def get_run(self, run_id: str) -> RunInfo:
        return RunInfo.model_validate(self.http.get(f"runs/{run_id}"))

    def delete_run(self, run_id: str) -> RunInfo:
        return RunInfo.model_validate(self.http.delete(f"runs/{run_id}"))

    def checkpoints(self, run_id: str | None = None) -> list[CheckpointInfo]:
        path = f"runs/{run_id}/checkpoints" if run_id else "checkpoints"
        return CheckpointList.model_validate(self.http.get(path)).checkpoints

    def metrics(self, run_id: str) -> MetricHistory:
        return MetricHistory.model_validate(self.http.get(f"runs/{run_id}/metrics"))

    def runs_frame(self, **kw: Any) -> Any:
        """``runs()`` as a pandas DataFrame (pandas needed)."""
        return _frames.runs_frame(self.runs(**kw))

    def checkpoints_frame(self, run_id: str | None = None) -> Any:
        return _frames.checkpoints_frame(self.checkpoints(run_id))

    def metrics_frame(self, run_id: str) -> Any:
        return _frames.metrics_frame(self.metrics(run_id))

    # ---- async twin -------------------------------------------------------------------------------------------
    @property
    def ahttp(self) -> AsyncHTTP:
        """The async client of this session, for the running event loop (one per loop)."""
        import asyncio

        loop = asyncio.get_running_loop()
        if self._ahttp is None or self._ahttp[0] is not loop:
            self._ahttp = (loop, self.http.async_twin())
        return self._ahttp[1]

    @property
    def aio(self) -> AsyncSession:
        """This session's ``await``-able twin: ``await session.aio.runs()``, ``await session.aio.submit(...)``."""
        return AsyncSession(self)

    def usage_rows(self, since: str | float | None = None, until: str | float | None = None,
                   user: str | None = None) -> list[dict[str, Any]]:
        """Your metered usage per base model: tokens trained/prefilled/sampled, requests, checkpoint bytes.
        ``since``/``until``: ISO time, epoch seconds or a duration back from now (``24h``, ``7d``); ``user``:
        admins only. Another user's usage is refused (403)."""
        params = {k: v for k, v in (("since", since), ("until", until), ("user", user)) if v is not None}
        return list(self.http.get("usage", params=params)["rows"])

    def server_load(self) -> dict[str, Any]:
        """The server's live load and your usage: ``{window_s, tokens_per_s: {trained, prefilled, sampled},
        queue_depth, replicas: [...], usage: [...]}`` (what the JupyterLab panel shows)."""
        return dict(self.http.get("load"))

    def usage(self, since: str | float | None = None, until: str | float | None = None,
              user: str | None = None) -> Any:
        """:meth:`usage_rows` as a pandas DataFrame (a list of dicts without pandas)."""
        return _frames.frame(self.usage_rows(since, until, user))

    # ---- futures --------------------------------------------------------------------------------------------
    def submit(self, path: str, body: dict[str, Any], parse: Any = lambda x: x, kind: str = "", *,
               wait: float = 0.0) -> RemoteFuture[Any]:
        """POST a future-returning request. ``wait`` > 0: the server holds the reply up to ``wait`` seconds and
        includes the result when it is ready by then (one round trip for a blocking call)."""
        self.wait_posted()
        t0 = time.monotonic()
        if wait > 0:
            reply = self.http.post(path, body, params={"wait": round(wait, 3)}, timeout=wait + 30.0)
        else:
            reply = self.http.post(path, body)
        return self._future(reply, parse, kind, t0)

    def submit_in_background(self, path: str, body: dict[str, Any], parse: Any = lambda x: x,
                             kind: str = "") -> PostedFuture[Any]:
        """POST a future-returning request from a background thread and return at once. Consecutive background
        submits are in flight together (up to ``_POST_THREADS``); any later ``submit`` waits until they have been
        answered, so the server still sees the program's order wherever it matters (a sample asked before an
        ``optim_step`` uses the weights before it). Only for requests whose order among themselves is free
        (samples)."""
        t0 = time.monotonic()

        def post() -> RemoteFuture[Any]:
            return self._future(self.http.post(path, body), parse, kind, t0)

        with self._posting_lock:
            if self._posts is None:
                self._posts = concurrent.futures.ThreadPoolExecutor(_POST_THREADS, thread_name_prefix="twinkle-post")
            posting = self._posts.submit(post)
            self._posting.add(posting)
        posting.add_done_callback(self._posted)
        return PostedFuture(posting, kind)

    def _posted(self, posting: concurrent.futures.Future[Any]) -> None:
        with self._posting_lock:
            self._posting.discard(posting)

    def _stop_posting(self) -> None:
        with self._posting_lock:
            pool, self._posts = self._posts, None
        if pool is not None:
            pool.shutdown(wait=False)

    def wait_posted(self) -> None:
        """Wait until every background submit has been answered (their errors stay with their futures)."""
        with self._posting_lock:
            pending = list(self._posting)
        if pending:
            concurrent.futures.wait(pending)

    def _future(self, reply: Any, parse: Any, kind: str, submitted: float | None = None) -> RemoteFuture[Any]:
        ref = FutureRef.model_validate(reply)
        if ref.stop_requested:
            self.stop_requested.set()
        fut: RemoteFuture[Any] = RemoteFuture(self, ref, parse, kind, submitted=submitted)
        if ref.state is not None:
            fut._settle(ref.state)
        return fut

    # ---- display --------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What the HTML repr shows, as plain data (server, base models, your runs, capacity, lease)."""
        out: dict[str, Any] = {
            "url": self.url, "session_id": self.session_id, "state": self.state,
            "lease_seconds": self.info.lease_seconds,
            "lease_left_s": max(0.0, self.info.last_heartbeat + self.info.lease_seconds - time.time()),
        }
        try:
            caps = self.capabilities()
            out["version"] = caps.version
            out["base_models"] = [m.model_dump() for m in caps.base_models]
            out["runs"] = [r.model_dump() for r in self.runs(all_sessions=False)]
            st = self.server_status()
            out["capacity"] = [
                {"base_model": w.base_model, "replica": w.replica, "adapters": w.adapters,
                 "queue_depth": w.queue_depth} for w in st.workers
            ]
        except TwinkleError as e:
            out["error"] = str(e)
        return out

    def _repr_html_(self) -> str:
        s = self.summary()
        e = html.escape
        color = {"connected": "#2e7d32", "reconnecting": "#ef6c00"}.get(self.state, "#c62828")
        rows = [
            f"<tr><th style='text-align:left'>server</th><td>{e(s['url'])} (v{e(str(s.get('version', '?')))})</td></tr>",
            f"<tr><th style='text-align:left'>session</th><td><code>{e(self.session_id)}</code> "
            f"<b style='color:{color}'>{e(self.state)}</b></td></tr>",
            f"<tr><th style='text-align:left'>lease</th><td>{s['lease_left_s']:.0f} s left of "
            f"{s['lease_seconds']:.0f} s (heartbeat every {self.heartbeat_interval:.0f} s)</td></tr>",
        ]
        models = s.get("base_models", [])
        caps_by_model: dict[str, int] = {}
        for w in s.get("capacity", []):
            caps_by_model[w["base_model"]] = caps_by_model.get(w["base_model"], 0) + w["adapters"]
        if models:
            items = "".join(
                f"<li><code>{e(m['name'])}</code> — {e(m['backend'])}, rank ≤ {m['max_lora_rank']}, "
                f"adapters {caps_by_model.get(m['name'], 0)}/{m['max_adapters'] * m.get('replicas', 1)}</li>"
                for m in models
            )
            rows.append(f"<tr><th style='text-align:left;vertical-align:top'>base models</th><td><ul style='margin:0'>{items}</ul></td></tr>")
        runs = s.get("runs", [])
        if runs:
            items = "".join(
                f"<li><code>{e(r['run_id'])}</code> {e(r.get('name') or '')} — {e(r['state'])}, step {r['step']}"
                + (f", loss {r['last_metrics']['loss']:.4g}" if "loss" in r.get("last_metrics", {}) else "")
                + "</li>"
                for r in runs
            )
        else:
            items = "<li>none yet</li>"
        rows.append(f"<tr><th style='text-align:left;vertical-align:top'>your runs</th><td><ul style='margin:0'>{items}</ul></td></tr>")
        if "error" in s:
            rows.append(f"<tr><th style='text-align:left'>error</th><td>{e(s['error'])}</td></tr>")
        return "<div><b>Twinkle session</b><table>" + "".join(rows) + "</table></div>"

    def __repr__(self) -> str:
        return f"Session(url={self.url!r}, session_id={self.session_id!r}, state={self.state!r})"


NOTEBOOK_LEASE_S = 600.0
"""The lease a notebook kernel asks for when none is given: a kernel restart or a long pause between cells
must not unload the adapters (a script gets the server's default, 60 s unless configured)."""


def default_lease_seconds() -> float | None:
    """``$TWINKLE_LEASE_SECONDS``, else ``NOTEBOOK_LEASE_S`` inside a Jupyter kernel, else the server's default."""
    env = os.environ.get("TWINKLE_LEASE_SECONDS")
    if env:
        try:
            return float(env)
        except ValueError:
            raise ConnectionLostError(f"TWINKLE_LEASE_SECONDS={env!r} is not a number of seconds") from None
    return NOTEBOOK_LEASE_S if _frames.in_notebook() else None


class AsyncSession:
    """The async twin of a :class:`Session` (httpx's Client/AsyncClient split): the same requests, awaited.
    Lease, heartbeat and local state stay with the wrapped session."""

    def __init__(self, session: Session):
        self.session = session

    @property
    def session_id(self) -> str:
        return self.session.session_id

    async def submit(self, path: str, body: dict[str, Any], parse: Any = lambda x: x, kind: str = "", *,
                     wait: float = 0.0) -> RemoteFuture[Any]:
        """``Session.submit`` without blocking the event loop; ``await`` the returned future for the result."""
        if self.session._posting:  # background submits first (the program's order; see submit_in_background)
            await asyncio.to_thread(self.session.wait_posted)
        http = self.session.ahttp
        t0 = time.monotonic()
        if wait > 0:
            reply = await http.post(path, body, params={"wait": round(wait, 3)}, timeout=wait + 30.0)
        else:
            reply = await http.post(path, body)
        return self.session._future(reply, parse, kind, t0)

    async def runs(self, *, all_sessions: bool = True, limit: int = 100) -> list[RunInfo]:
        body = await self.session.ahttp.get("runs", params={"limit": limit, "offset": 0})
        out = RunList.model_validate(body).runs
        return out if all_sessions else [r for r in out if r.session_id == self.session_id]

    async def get_run(self, run_id: str) -> RunInfo:
        return RunInfo.model_validate(await self.session.ahttp.get(f"runs/{run_id}"))

    async def delete_run(self, run_id: str) -> RunInfo:
        return RunInfo.model_validate(await self.session.ahttp.delete(f"runs/{run_id}"))

    async def metrics(self, run_id: str) -> MetricHistory:
        return MetricHistory.model_validate(await self.session.ahttp.get(f"runs/{run_id}/metrics"))

    async def checkpoints(self, run_id: str | None = None) -> list[CheckpointInfo]:
        path = f"runs/{run_id}/checkpoints" if run_id else "checkpoints"
        return CheckpointList.model_validate(await self.session.ahttp.get(path)).checkpoints

    async def heartbeat(self) -> SessionInfo:
        self.session.info = SessionInfo.model_validate(
            await self.session.ahttp.post(f"sessions/{self.session_id}/heartbeat", retry=False))
        return self.session.info

    async def request_stop(self) -> SessionInfo:
        return SessionInfo.model_validate(await self.session.ahttp.post(f"sessions/{self.session_id}/stop"))


#: How long ``connect`` retries when nothing answers before it fails fast (later blips: ``retry_seconds``).
CONNECT_RETRY_SECONDS = 2.0


def connect(
    url: str,
    api_key: str | None = None,
    session_id: str | None = None,
    *,
    lease_seconds: float | None = None,
    metadata: dict[str, Any] | None = None,
    transport: httpx.BaseTransport | None = None,
    heartbeat: bool = True,
    retry_seconds: float = 60.0,
    persist_state: bool = True,
    make_current: bool = True,
) -> Session:
    """Open a session on the server at ``url`` (or re-attach to ``session_id``) and start heart-beating.

    Raises ``ConnectionLostError`` when no server answers, ``AuthenticationError`` for a bad key and
    ``GoneError`` when ``session_id`` has expired or was closed.
    """
    if not url:
        raise ConnectionLostError("no server URL given (pass url= or set TWINKLE_SERVER_URL)")
    check_unexpanded(url, "server URL")
    check_unexpanded(api_key, "API key")
    if "://" not in url:
        url = "http://" + url
    http = HTTP(url, api_key, transport=transport, retry_seconds=retry_seconds)
    try:
        # fail fast when nothing answers at connect time; later blips are retried for retry_seconds
        if session_id:
            info = SessionInfo.model_validate(http.get(f"sessions/{session_id}", retry_seconds=min(retry_seconds, CONNECT_RETRY_SECONDS)))
            if info.state != "active":
                raise GoneError(f"session {session_id} is {info.state}; open a new one with connect(url, api_key)")
            info = SessionInfo.model_validate(http.post(f"sessions/{session_id}/heartbeat"))
        else:
            meta = {"client": "twinkle_client", "host": socket.gethostname(), "pid": os.getpid()}
            meta.update(metadata or {})
            body: dict[str, Any] = {"metadata": meta}
            lease_seconds = lease_seconds if lease_seconds is not None else default_lease_seconds()
            if lease_seconds is not None:
                body["lease_seconds"] = lease_seconds
            info = SessionInfo.model_validate(http.post("sessions", body, retry_seconds=min(retry_seconds, CONNECT_RETRY_SECONDS)))
    except BaseException:
        http.close()
        raise
    session = Session(http, info, heartbeat=heartbeat, persist_state=persist_state)
    if persist_state:
        try:
            _state.write_connection(session.url, api_key, session.session_id)
        except OSError:
            pass
    if make_current:
        _set_current(session)
    return session


# ---- re-attach without traps (the policy is described in ``_reattach``) ------------------------------------
def restore_runs(session: Session, old_session_id: str) -> list[RunInfo]:
    """Re-create, in ``session``, every run of ``old_session_id`` that was unloaded with a training checkpoint
    (the automatic one taken when its lease lapsed, or the last one saved), with its optimizer state."""
    restored = []
    for r in session.runs():
        if r.session_id != old_session_id or r.state not in ("unloaded", "lost") or not r.last_checkpoint:
            continue
        body = {"session_id": session.session_id, "checkpoint": r.last_checkpoint, "optimizer": True}
        reply = session.http.post("runs/resume", body, params={"wait": SUBMIT_WAIT_S}, timeout=SUBMIT_WAIT_S + 30)
        ref = FutureRef.model_validate(reply)
        fut: RemoteFuture[RunInfo] = RemoteFuture(session, ref, RunInfo.model_validate, "resume_run")
        if ref.state is not None:
            fut._settle(ref.state)
        run = fut.result()
        # A new run on the server: no request of it is outstanding or recorded, so its seq_ids start at 1.
        # (Without this record the client, finding a run it has no seq record of, jumps its seq_ids far ahead
        # and the first step waits the scheduler's whole seq grace for the gap.)
        session.run_state.bump_seq_id(run.run_id, 1)
        restored.append(run)
    return restored


def open_session(url: str, api_key: str | None, *, session_id: str | None = None, new: bool = False,
                 **kw: Any) -> Session:
    """Connect the notebook way (see the module doc). ``session_id``: re-attach to that one; else the one the
    last kernel left (unless ``new``). The returned session's ``notice`` is a line worth printing."""
    explicit = session_id is not None
    if session_id is None and not new:
        saved = _state.read_connection() or {}
        if (saved.get("session_id") and _reattach.same_url(saved.get("url", ""), url)
                and saved.get("api_key") == api_key
                and (saved.get("pid") == os.getpid() or not _reattach.alive(saved.get("pid")))):
            session_id = saved["session_id"]
    if session_id is None:
        sess = connect(url, api_key, **kw)
        sess.notice = f"new session {sess.session_id}"
        return sess
    cur = current_session(required=False)
    if cur is not None and cur.session_id == session_id and _reattach.same_url(cur.url, url):
        cur.notice = f"already attached to session {session_id}"
        return cur
    try:
        sess = connect(url, api_key, session_id=session_id, **kw)
    except GoneError:
        sess = connect(url, api_key, **kw)
        try:
            restored = restore_runs(sess, session_id)
        except TwinkleError as e:
            sess.notice = (f"session {session_id} ended (lease expired?) and its runs could not be restored ({e}); "
                           f"new session {sess.session_id}")
            return sess
        sess.restored = restored
        if restored:
            sess.notice = (f"session {session_id} had expired; restored {_reattach.describe_runs(restored)} from the automatic "
                           f"checkpoint into new session {sess.session_id}")
        else:
            sess.notice = f"session {session_id} had ended with no run to restore; new session {sess.session_id}"
        return sess
    runs = [r for r in sess.runs(all_sessions=False) if r.state == "active"]
    how = "re-attached to" if explicit else "re-attached to the previous kernel's"
    sess.notice = f"{how} session {session_id} ({_reattach.describe_runs(runs)}); `--new` / new=True starts a fresh one"
    return sess
