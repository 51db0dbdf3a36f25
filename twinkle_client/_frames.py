"""What the client's notebook helpers share without importing each other: whether this is a Jupyter kernel, and
listings as pandas DataFrames (a list of dicts without pandas). Imports nothing of ``twinkle_client``."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["checkpoints_frame", "frame", "in_notebook", "metrics_frame", "runs_frame", "when"]


def in_notebook() -> bool:
    """True inside a Jupyter kernel (not a terminal IPython, not a script)."""
    ip = sys.modules.get("IPython")
    if ip is None:
        return False
    try:
        shell = ip.get_ipython()
    except Exception:
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


# ---- DataFrames ---------------------------------------------------------------------------------------------------


def frame(rows: list[dict[str, Any]]) -> Any:
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows)


def when(epoch: float | None) -> Any:
    """Epoch seconds as a local ``datetime`` to the second (what the frames and ``%twinkle runs`` show)."""
    import datetime as _dt

    if epoch is None:
        return None
    return _dt.datetime.fromtimestamp(float(epoch)).replace(microsecond=0)


def runs_frame(runs: Iterable[Any]) -> Any:
    """One row per run: the per-token mean ``loss`` the server recorded last (the panel's number), times as
    local datetimes."""
    rows = []
    for r in runs:
        d = r.model_dump() if hasattr(r, "model_dump") else dict(r)
        m = d.get("last_metrics") or {}
        rows.append({"run_id": d["run_id"], "name": d.get("name"), "base_model": d.get("base_model"),
                     "state": d.get("state"), "step": d.get("step"), "rank": (d.get("lora") or {}).get("rank"),
                     "loss": m.get("loss"), "grad_norm": m.get("grad_norm:mean", m.get("grad_norm")),
                     "created": when(d.get("created_at")), "last_active": when(d.get("last_request_time")),
                     "last_checkpoint": d.get("last_checkpoint"), "session_id": d.get("session_id")})
    return frame(rows)


def checkpoints_frame(checkpoints: Iterable[Any]) -> Any:
    rows = [c.model_dump() if hasattr(c, "model_dump") else dict(c) for c in checkpoints]
    return frame([{**{k: r.get(k) for k in ("run_id", "name", "kind", "step", "path")},
                    "created": when(r.get("created_at")), "size_bytes": r.get("size_bytes")} for r in rows])


def metrics_frame(history: Any) -> Any:
    """A run's metric history (from the server: the whole run, also after a kernel restart) as a frame."""
    points = history.points if hasattr(history, "points") else history
    return frame([{"step": p.step, "time": when(p.time), "kind": p.kind, **p.metrics} for p in points])
