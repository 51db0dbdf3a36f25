"""Re-attach without traps: what ``init_twinkle_client``, ``%twinkle connect`` and ``%twinkle resume`` do.

* A kernel whose previous incarnation (same server, same key, a process that is gone) left a session within
  its lease re-attaches to it — its runs continue at their step, with their optimizer state — instead of
  silently opening a new session whose adapters start at step 0. ``new=True`` (``--new``) opts out.
* A session whose lease lapsed had its runs checkpointed automatically (``auto-…``) and unloaded: a new
  session is opened and each such run is restored from that checkpoint (same name, step and optimizer state)
  in the same call; ``session.notice`` says what happened.
"""

from __future__ import annotations

import os
from typing import Any

from twinkle.types import GoneError, TwinkleError
from twinkle.types.api import FutureRef, RunInfo

from . import _state
from . import session as _session
from ._futures import SUBMIT_WAIT_S, RemoteFuture
from .session import Session, current_session

__all__ = ["open_session", "restore_runs"]


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _same_url(a: str, b: str) -> bool:
    def norm(u: str) -> str:
        u = u.strip().rstrip("/")
        return u if "://" in u else "http://" + u

    return norm(a) == norm(b)


def _describe(runs: list[RunInfo]) -> str:
    return ", ".join(f"{r.name or r.run_id} at step {r.step}" for r in runs) or "no runs"


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
        restored.append(fut.result())
    return restored


def open_session(url: str, api_key: str | None, *, session_id: str | None = None, new: bool = False,
                 **kw: Any) -> Session:
    """Connect the notebook way (see the module doc). ``session_id``: re-attach to that one; else the one the
    last kernel left (unless ``new``). The returned session's ``notice`` is a line worth printing."""
    explicit = session_id is not None
    if session_id is None and not new:
        saved = _state.read_connection() or {}
        if (saved.get("session_id") and _same_url(saved.get("url", ""), url)
                and saved.get("api_key") == api_key
                and (saved.get("pid") == os.getpid() or not _alive(saved.get("pid")))):
            session_id = saved["session_id"]
    if session_id is None:
        sess = _session.connect(url, api_key, **kw)
        sess.notice = f"new session {sess.session_id}"
        return sess
    cur = current_session(required=False)
    if cur is not None and cur.session_id == session_id and _same_url(cur.url, url):
        cur.notice = f"already attached to session {session_id}"
        return cur
    try:
        sess = _session.connect(url, api_key, session_id=session_id, **kw)
    except GoneError:
        sess = _session.connect(url, api_key, **kw)
        try:
            restored = restore_runs(sess, session_id)
        except TwinkleError as e:
            sess.notice = (f"session {session_id} ended (lease expired?) and its runs could not be restored ({e}); "
                           f"new session {sess.session_id}")
            return sess
        sess.restored = restored
        if restored:
            sess.notice = (f"session {session_id} had expired; restored {_describe(restored)} from the automatic "
                           f"checkpoint into new session {sess.session_id}")
        else:
            sess.notice = f"session {session_id} had ended with no run to restore; new session {sess.session_id}"
        return sess
    runs = [r for r in sess.runs(all_sessions=False) if r.state == "active"]
    how = "re-attached to" if explicit else "re-attached to the previous kernel's"
    sess.notice = f"{how} session {session_id} ({_describe(runs)}); `--new` / new=True starts a fresh one"
    return sess
