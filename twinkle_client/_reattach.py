"""Re-attach without traps: what ``init_twinkle_client``, ``%twinkle connect`` and ``%twinkle resume`` do.

* A kernel whose previous incarnation (same server, same key, a process that is gone) left a session within
  its lease re-attaches to it — its runs continue at their step, with their optimizer state — instead of
  silently opening a new session whose adapters start at step 0. ``new=True`` (``--new``) opts out.
* A session whose lease lapsed had its runs checkpointed automatically (``auto-…``) and unloaded: a new
  session is opened and each such run is restored from that checkpoint (same name, step and optimizer state)
  in the same call; ``session.notice`` says what happened.

This module holds the policy's pure helpers; ``open_session`` and ``restore_runs`` live in ``session`` (they
build sessions, and ``Session.resume`` uses them), so the two modules import in one direction only.
"""

from __future__ import annotations

import os
from typing import Any

from twinkle.types.api import RunInfo

__all__ = ["alive", "describe_runs", "same_url"]


def alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def same_url(a: str, b: str) -> bool:
    def norm(u: str) -> str:
        u = u.strip().rstrip("/")
        return u if "://" in u else "http://" + u

    return norm(a) == norm(b)


def describe_runs(runs: list[RunInfo]) -> str:
    return ", ".join(f"{r.name or r.run_id} at step {r.step}" for r in runs) or "no runs"
