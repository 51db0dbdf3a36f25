"""Live training widgets: a loss/metrics curve under the running cell, a Stop button, a sample viewer.

In a Jupyter kernel with ``ipywidgets`` the curve is an inline SVG redrawn in place (throttled), several runs
overlaid; elsewhere (a plain script, no ipywidgets) the same calls degrade to a ``tqdm`` bar and text lines.
Listings convert to pandas DataFrames when pandas is installed. Nothing heavy is imported at module import.

    curve = LiveCurve(metrics=("loss",))
    for batch in curve.iterate(loader):           # ends cleanly after the current step when Stop is pressed
        model.forward_backward(inputs=batch); model.clip_grad_and_step()
        curve.log(model.calculate_metric(), run="mine")
"""

from __future__ import annotations

import html
import math
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

__all__ = [
    "LiveCurve",
    "SampleViewer",
    "checkpoints_frame",
    "in_notebook",
    "metrics_frame",
    "render_sample_html",
    "runs_frame",
    "svg_curve",
]

T = TypeVar("T")
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


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


def _widgets_module() -> Any:
    try:
        import ipywidgets
    except ImportError:
        return None
    return ipywidgets


# ---- the curve ---------------------------------------------------------------------------------------------------


def svg_curve(series: dict[str, list[tuple[float, float]]], *, title: str = "", width: int = 560,
              height: int = 220, ylabel: str = "") -> str:
    """An inline SVG line chart of ``{label: [(x, y), ...]}`` (no matplotlib)."""
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(y)]
    left, right, top, bottom = 52, 12, 22, 28
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
             f"style='font:11px sans-serif;background:#fff'>"]
    if title:
        parts.append(f"<text x='{left}' y='14' font-weight='bold'>{html.escape(title)}</text>")
    if pts:
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
        if x1 == x0:
            x1 = x0 + 1
        if y1 == y0:
            y0, y1 = y0 - 0.5, y1 + 0.5
        w, h = width - left - right, height - top - bottom

        def sx(x: float) -> float:
            return left + (x - x0) / (x1 - x0) * w

        def sy(y: float) -> float:
            return top + (1 - (y - y0) / (y1 - y0)) * h

        parts.append(f"<rect x='{left}' y='{top}' width='{w}' height='{h}' fill='none' stroke='#ccc'/>")
        for v in (y0, (y0 + y1) / 2, y1):
            parts.append(f"<text x='{left - 4}' y='{sy(v) + 4:.1f}' text-anchor='end'>{v:.3g}</text>")
        parts.append(f"<text x='{left}' y='{height - 8}'>{x0:g}</text>"
                     f"<text x='{left + w}' y='{height - 8}' text-anchor='end'>{x1:g}</text>")
        for i, (label, s) in enumerate(series.items()):
            good = [(x, y) for x, y in s if math.isfinite(y)]
            if not good:
                continue
            color = _COLORS[i % len(_COLORS)]
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
            parts.append(f"<polyline fill='none' stroke='{color}' stroke-width='1.8' points='{path}'/>")
            parts.append(f"<text x='{left + w - 4}' y='{top + 14 + 13 * i}' text-anchor='end' fill='{color}'>"
                         f"{html.escape(label)}: {good[-1][1]:.4g}</text>")
    else:
        parts.append(f"<text x='{left}' y='{height // 2}' fill='#888'>waiting for the first step…</text>")
    if ylabel:
        parts.append(f"<text x='4' y='{top + 10}' fill='#555'>{html.escape(ylabel)}</text>")
    parts.append("</svg>")
    return "".join(parts)


class LiveCurve:
    """Metrics of one or several runs, plotted as they arrive.

    ``log(metrics, step=None, run="default")`` records one step; the display refreshes at most every
    ``throttle_s`` seconds (and always on ``close()``). ``iterate(xs)`` yields until ``stop()`` is called or
    the Stop button is pressed, so the loop ends after the step in progress. ``mode``: ``"widget"``
    (ipywidgets), ``"text"`` (tqdm bar + lines), or None to choose automatically.
    """

    def __init__(self, metrics: Sequence[str] = ("loss",), *, title: str = "training", total: int | None = None,
                 throttle_s: float = 0.5, mode: str | None = None, display: bool = True):
        self.metrics = tuple(metrics)
        self.title = title
        self.total = total
        self.throttle_s = throttle_s
        self.history: dict[str, list[dict[str, float]]] = {}
        self._stop = threading.Event()
        self._last_draw = 0.0
        self._dirty = False
        self._bar: Any = None
        self.widget: Any = None
        w = _widgets_module()
        if mode is None:
            mode = "widget" if w is not None and in_notebook() else "text"
        if mode == "widget" and w is None:
            mode = "text"
        self.mode = mode
        if mode == "widget":
            self._build_widget(w)
            if display:
                from IPython.display import display as _display

                _display(self.widget)

    # ---- widget ------------------------------------------------------------------------------------------------
    def _build_widget(self, w: Any) -> None:
        import traitlets

        class _CurveBox(w.VBox):  # the synced ``data`` trait carries every logged point to the frontend model
            data = traitlets.Dict().tag(sync=True)

        self.chart = w.HTML(value=svg_curve({}, title=self.title))
        self.status = w.HTML(value="")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop",
                                    tooltip="end the loop after the current step")
        self.stop_button.on_click(lambda _b: self.stop())
        self.widget = _CurveBox(children=[self.chart, w.HBox([self.stop_button, self.status])])

    # ---- recording ---------------------------------------------------------------------------------------------
    def log(self, metrics: dict[str, Any], step: int | None = None, run: str = "default") -> None:
        pts = self.history.setdefault(run, [])
        if step is None:
            step = int(metrics.get("step", len(pts) + 1))
        rec = {"step": float(step)}
        for k, v in metrics.items():
            try:
                rec[k] = float(v)
            except (TypeError, ValueError):
                continue
        rec["step"] = float(step)
        pts.append(rec)
        self._dirty = True
        if self.mode == "text":
            self._text_update(run, rec)
        elif time.monotonic() - self._last_draw >= self.throttle_s:
            self.refresh()

    def _text_update(self, run: str, rec: dict[str, float]) -> None:
        shown = {k: f"{rec[k]:.4g}" for k in self.metrics if k in rec}
        if self._bar is None:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total, desc=self.title, unit="step", dynamic_ncols=True,
                                 mininterval=self.throttle_s)
            except ImportError:
                self._bar = False
        if self._bar:
            self._bar.set_postfix({("" if run == "default" else f"{run}/") + k: v for k, v in shown.items()},
                                  refresh=False)
            self._bar.update(1)
        else:
            print(f"[{self.title}] {run} step {int(rec['step'])}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))

    def refresh(self) -> None:
        """Redraw now (the widget's model state gets every point logged so far)."""
        self._last_draw = time.monotonic()
        self._dirty = False
        if self.mode != "widget":
            return
        series = {}
        for run, pts in self.history.items():
            for m in self.metrics:
                label = m if len(self.history) == 1 else f"{run} {m}"
                series[label] = [(p["step"], p[m]) for p in pts if m in p]
        self.chart.value = svg_curve(series, title=self.title)
        self.widget.data = {run: [dict(p) for p in pts] for run, pts in self.history.items()}
        last = {run: pts[-1] for run, pts in self.history.items() if pts}
        text = " · ".join(f"<b>{html.escape(r)}</b> step {int(p['step'])}"
                          + "".join(f", {html.escape(m)} {p[m]:.4g}" for m in self.metrics if m in p)
                          for r, p in last.items())
        self.status.value = text + (" — <i>stopping after this step</i>" if self.stopped else "")

    # ---- loop control --------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to end after the step in progress (what the Stop button does)."""
        self._stop.set()
        if self.mode == "widget":
            self.stop_button.disabled = True
            self.refresh()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def iterate(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yield items until exhausted or stopped; the item being processed when Stop is pressed completes."""
        if self.total is None and hasattr(iterable, "__len__"):
            self.total = len(iterable)  # type: ignore[arg-type]
        try:
            for item in iterable:
                if self.stopped:
                    break
                yield item
        finally:
            self.close()

    def range(self, n: int) -> Iterator[int]:
        self.total = n
        return self.iterate(range(n))

    def close(self) -> None:
        if self.mode == "widget":
            self.refresh()
            self.stop_button.disabled = True
        elif self._bar:
            self._bar.close()
            self._bar = None

    def frame(self) -> Any:
        """All logged points as a pandas DataFrame (columns: run, step, metrics…)."""
        rows = [{"run": run, **p} for run, pts in self.history.items() for p in pts]
        return _frame(rows)

    def _repr_html_(self) -> str:
        series = {f"{run} {m}": [(p["step"], p[m]) for p in pts if m in p]
                  for run, pts in self.history.items() for m in self.metrics}
        return svg_curve(series, title=self.title)


# ---- samples -----------------------------------------------------------------------------------------------------


def _heat(lp: float | None) -> str:
    if lp is None or not math.isfinite(lp):
        return "#eeeeee"
    p = max(0.0, min(1.0, math.exp(lp)))
    r, g = int(255 * (1 - p) + 200 * p), int(180 * (1 - p) + 240 * p)
    return f"rgb({r},{g},{int(180 * (1 - p) + 200 * p)})"


def render_sample_html(prompt: str, tokens: Sequence[str], logprobs: Sequence[float | None] | None = None,
                       reward: float | None = None, title: str | None = None) -> str:
    """One sample as HTML: the prompt, the completion token by token coloured by probability, the reward."""
    e = html.escape
    lps = list(logprobs) if logprobs is not None else [None] * len(tokens)
    spans = "".join(
        f"<span title='logprob {lp:.3f}' style='background:{_heat(lp)};white-space:pre-wrap'>{e(t)}</span>"
        if lp is not None else f"<span style='white-space:pre-wrap'>{e(t)}</span>"
        for t, lp in zip(tokens, lps, strict=False)
    )
    head = f"<b>{e(title)}</b> " if title else ""
    rew = f" <span style='float:right'>reward <b>{reward:.3g}</b></span>" if reward is not None else ""
    return (f"<div style='border:1px solid #ddd;padding:6px;margin:4px 0;font:12px monospace'>{head}{rew}"
            f"<div style='color:#555'>{e(prompt)}</div><div>{spans}</div></div>")


class SampleViewer:
    """Shows samples (prompt, completion, per-token logprob heat-map, reward) under the cell; text elsewhere."""

    def __init__(self, tokenizer: Any = None, *, max_shown: int = 8, mode: str | None = None, display: bool = True):
        self.tokenizer = tokenizer
        self.max_shown = max_shown
        self.samples: list[dict[str, Any]] = []
        w = _widgets_module()
        if mode is None:
            mode = "widget" if w is not None and in_notebook() else "text"
        self.mode = mode if (mode != "widget" or w is not None) else "text"
        self.widget = w.HTML(value="") if self.mode == "widget" else None
        if self.widget is not None and display:
            from IPython.display import display as _display

            _display(self.widget)

    def _pieces(self, tokens: Sequence[int]) -> list[str]:
        if self.tokenizer is None:
            return [f"⟨{t}⟩" for t in tokens]
        return [self.tokenizer.decode([t]) for t in tokens]

    def add(self, prompt: str | Sequence[int], tokens: Sequence[int], logprobs: Sequence[float] | None = None,
            reward: float | None = None, title: str | None = None) -> None:
        if not isinstance(prompt, str):
            prompt = self.tokenizer.decode(list(prompt)) if self.tokenizer is not None else str(list(prompt))
        pieces = self._pieces(tokens)
        lps = list(logprobs) if logprobs is not None else None
        rec = {"prompt": prompt, "tokens": list(tokens), "pieces": pieces, "logprobs": lps, "reward": reward,
               "title": title}
        self.samples.append(rec)
        if self.widget is not None:
            shown = self.samples[-self.max_shown:]
            self.widget.value = "".join(render_sample_html(s["prompt"], s["pieces"], s["logprobs"], s["reward"],
                                                           s["title"]) for s in shown)
        else:
            mean = (sum(lps) / len(lps)) if lps else None
            extra = "".join([f" reward={reward:.3g}" if reward is not None else "",
                             f" mean_logprob={mean:.3f}" if mean is not None else ""])
            print(f"{title + ': ' if title else ''}{prompt!r} -> {''.join(pieces)!r}{extra}")

    def add_response(self, prompt: str | Sequence[int], response: Any, rewards: Sequence[float] | None = None) -> None:
        """Add every sequence of a ``SampleResponse``."""
        for i, seq in enumerate(response.sequences):
            self.add(prompt, seq.tokens, seq.logprobs, None if rewards is None else rewards[i], title=f"sample {i}")

    def frame(self) -> Any:
        return _frame([{k: v for k, v in s.items() if k != "pieces"} for s in self.samples])


# ---- DataFrames ---------------------------------------------------------------------------------------------------


def _frame(rows: list[dict[str, Any]]) -> Any:
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows)


def runs_frame(runs: Iterable[Any]) -> Any:
    rows = []
    for r in runs:
        d = r.model_dump() if hasattr(r, "model_dump") else dict(r)
        rows.append({"run_id": d["run_id"], "name": d.get("name"), "base_model": d.get("base_model"),
                     "state": d.get("state"), "step": d.get("step"), "rank": (d.get("lora") or {}).get("rank"),
                     "loss": (d.get("last_metrics") or {}).get("loss"), "last_checkpoint": d.get("last_checkpoint"),
                     "session_id": d.get("session_id")})
    return _frame(rows)


def checkpoints_frame(checkpoints: Iterable[Any]) -> Any:
    rows = [c.model_dump() if hasattr(c, "model_dump") else dict(c) for c in checkpoints]
    return _frame([{k: r.get(k) for k in ("run_id", "name", "kind", "step", "path", "created_at", "size_bytes")}
                   for r in rows])


def metrics_frame(history: Any) -> Any:
    points = history.points if hasattr(history, "points") else history
    return _frame([{"step": p.step, "time": p.time, "kind": p.kind, **p.metrics} for p in points])
