"""Whole-run metric history from the server, runs side by side, and static charts that render anywhere.

    from twinkle_client.history import compare, run_history
    run_history(model)                    # every step of the run, also across a kernel restart or a resume
    compare(run_a, run_b, metrics=("loss",), smoothing=0.6)   # overlaid, one panel per metric
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from . import _charts
from .session import Session, current_session

__all__ = ["Chart", "compare", "run_history"]

_MAX_CHAIN = 16


def _run_id(run: Any) -> str:
    if isinstance(run, str):
        return run
    if hasattr(run, "run_id"):
        return str(run.run_id)
    raise TypeError(f"a run is a run id, a RunInfo or a model with an adapter, not {type(run).__name__}")


def _predecessor(info: Any) -> tuple[str, int] | None:
    """``(run id, step)`` of the checkpoint a resumed run started from (``metadata.resumed_from``)."""
    src = (info.metadata or {}).get("resumed_from")
    if not isinstance(src, str) or not src.startswith("tinker://"):
        return None
    rid = src[len("tinker://"):].split("/", 1)[0]
    return (rid, int(info.step)) if rid else None


def run_history(run: Any, *, session: Session | None = None) -> list[dict[str, float]]:
    """One dict per step (``step``, ``loss``, ``grad_norm``, ``lr``, …) for the WHOLE run: the server's metric
    history, following ``resumed_from`` back through the runs it was restored from (after a lease expiry)."""
    sess = session or current_session()
    by_step: dict[float, dict[str, float]] = {}
    rid: str | None = _run_id(run)
    limit = float("inf")  # an older run contributes only the steps before its successor began
    seen: set[str] = set()
    while rid and rid not in seen and len(seen) < _MAX_CHAIN:
        seen.add(rid)
        info = sess.get_run(rid)
        first_here = float("inf")
        for p in sess.metrics(rid).points:
            if p.kind not in ("forward_backward", "optim_step"):
                continue
            # a forward_backward is recorded before its step's optim_step counts it: it belongs to step + 1
            step = float(p.step + 1 if p.kind == "forward_backward" else p.step)
            if step > limit:
                continue
            first_here = min(first_here, step)
            by_step.setdefault(step, {"step": step}).update(p.metrics)
        prev = _predecessor(info)
        if prev is None:
            break
        rid = prev[0]
        limit = min(limit, first_here - 1 if first_here != float("inf") else float(info.step))
    return [by_step[s] for s in sorted(by_step)]


class Chart:
    """A finished chart: shows as a PNG (renders on GitHub, nbviewer and in untrusted JupyterLab); ``show()``
    displays the hoverable SVG; ``frame()`` is the same data as a pandas DataFrame."""

    def __init__(self, history: dict[str, list[dict[str, float]]], metrics: Sequence[str], *, title: str = "",
                 smoothing: float = 0.0, log_y: bool | Sequence[str] = False, footer: str = ""):
        self.history = history
        self.metrics = tuple(metrics)
        self.title = title
        self.smoothing = smoothing
        self.log_y = log_y
        self.footer = footer

    def panels(self) -> list[_charts.Panel]:
        return _charts.layout(self.history, self.metrics, log_y=self.log_y)

    def png(self) -> bytes:
        return _charts.png_chart(self.panels(), title=self.title, smoothing=self.smoothing, footer=self.footer)

    def svg(self) -> str:
        return _charts.svg_chart(self.panels(), title=self.title, smoothing=self.smoothing, footer=self.footer)

    def summary(self) -> str:
        parts = []
        for run, pts in self.history.items():
            last = pts[-1] if pts else {}
            vals = ", ".join(f"{m} {last[m]:.4g}" for m in self.metrics if m in last)
            parts.append(f"{run}: {len(pts)} steps" + (f", last {vals}" if vals else ""))
        return f"{self.title or 'chart'} — " + "; ".join(parts)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return {"image/png": base64.b64encode(self.png()).decode("ascii"), "text/plain": self.summary()}

    def show(self) -> None:
        """Display the interactive version (hover a point for its step and value)."""
        from IPython.display import HTML, display

        display(HTML(self.svg()))

    def frame(self) -> Any:
        from ._frames import frame

        return frame([{"run": run, **p} for run, pts in self.history.items() for p in pts])


def compare(*runs: Any, metrics: Sequence[str] = ("loss",), smoothing: float = 0.0,
            log_y: bool | Sequence[str] = False, title: str = "compare", session: Session | None = None) -> Chart:
    """Overlay the whole-run histories of several runs (run ids, ``RunInfo``s or models), one panel per metric."""
    sess = session or current_session()
    history: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        rid = _run_id(run)
        info = sess.get_run(rid)
        label = info.name or rid
        if label in history:
            label = f"{label} ({rid})"
        history[label] = run_history(rid, session=sess)
    return Chart(history, metrics, title=title, smoothing=smoothing, log_y=log_y)
