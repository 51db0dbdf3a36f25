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
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

from twinkle.types import ImageChunk, ModelInput

from . import _loggers
from ._frames import checkpoints_frame, in_notebook, metrics_frame, runs_frame, when
from ._frames import frame as _frame

__all__ = [
    "LiveCurve",
    "SampleViewer",
    "checkpoints_frame",
    "in_notebook",
    "metrics_frame",
    "render_sample_html",
    "render_samples_table",
    "runs_frame",
    "svg_curve",
    "when",
]

T = TypeVar("T")
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


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
                 throttle_s: float = 0.5, mode: str | None = None, display: bool = True, session: Any = None,
                 smoothing: float = 0.0, log_y: bool | Sequence[str] = False, history_of: Any = None,
                 log_to: str | Sequence[str] | None = None):
        self.metrics = tuple(metrics)
        self.session = session
        self.smoothing = smoothing
        self.log_y = log_y
        self._handle: Any = None
        self._times: list[float] = []  # monotonic time of each log() of this curve (steps/s, ETA)
        self.latency: list[dict[str, float]] = []  # per log(): the step's queue wait / execution / rest (seconds)
        self._lat_last: Any = None  # the newest session timing already counted (requests before this curve: none)
        sess = self._session()
        if sess is not None and getattr(sess, "latency", None):
            self._lat_last = sess.latency[-1]
        self.loggers = _loggers.open_loggers(log_to, title)
        self.stop_reason = ""
        self.stop_message: str | None = None
        self._t0 = time.monotonic()
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
        if history_of is not None:
            self.load_history(history_of)
        if mode == "widget":
            self._build_widget(w)
            if display:
                from IPython.display import display as _display

                self._handle = _display(self.widget, display_id=True)

    # ---- widget ------------------------------------------------------------------------------------------------
    def _build_widget(self, w: Any) -> None:
        import traitlets

        class _CurveBox(w.VBox):  # the synced ``data`` trait carries every logged point to the frontend model
            data = traitlets.Dict().tag(sync=True)

        self.chart = w.HTML(value=self.chart_obj().svg())
        self.status = w.HTML(value="")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop",
                                    tooltip="end the loop after the current step")
        self.stop_button.on_click(lambda _b: self.stop())
        # The Twinkle JupyterLab extension handles clicks on this class itself (through the Jupyter server to the
        # Twinkle server), so Stop works while the kernel is busy running the loop and cannot read the click.
        self.stop_button.add_class("twk-stop-button")
        sess = self._session()
        if sess is not None:
            self.stop_button.add_class(f"twk-stop-session-{sess.session_id}")
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
        self._times.append(time.monotonic())
        self._take_latency(step)
        for lg in self.loggers:
            lg.log(run, rec)
        self._dirty = True
        if self.mode == "text":
            self._text_update(run, rec)
        elif time.monotonic() - self._last_draw >= self.throttle_s:
            self.refresh()

    def _take_latency(self, step: int) -> None:
        """Sum the timings of the session's requests that finished since the last ``log()`` into this step's
        latency split: queue wait and execution on the server's worker, and the rest (ordering behind the run's
        earlier requests, transport, the client)."""
        sess = self._session()
        lat = getattr(sess, "latency", None) if sess is not None else None
        if not lat:
            return
        new: list[dict[str, Any]] = []
        for t in reversed(lat):
            if t is self._lat_last:
                break
            new.append(t)
        self._lat_last = lat[-1]
        timed = [t for t in new if t.get("exec_s") is not None]
        if not timed:
            return
        queue = sum(float(t["queue_s"] or 0.0) for t in timed)
        execution = sum(float(t["exec_s"] or 0.0) for t in timed)
        total = sum(float(t["round_trip_s"] or 0.0) for t in new)
        self.latency.append({"step": float(step), "total_s": total, "queue_s": queue, "exec_s": execution,
                             "other_s": max(0.0, total - queue - execution), "requests": float(len(new))})

    def latency_text(self) -> str:
        """The last step's latency split, one line (the widget's status line and the PNG footer show it)."""
        if not self.latency:
            return ""
        last = self.latency[-1]
        return (f"step latency {_secs(last['total_s'])}: queue {_secs(last['queue_s'])} · "
                f"execution {_secs(last['exec_s'])} · other {_secs(last['other_s'])}")

    def latency_frame(self) -> Any:
        """Every step's latency split as a pandas DataFrame (step, total_s, queue_s, exec_s, other_s, requests)."""
        return _frame([dict(r) for r in self.latency])

    def _text_update(self, run: str, rec: dict[str, float]) -> None:
        shown = {k: f"{rec[k]:.4g}" for k in self.metrics if k in rec}
        if self._bar is None:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total, desc=self.title, unit="step", dynamic_ncols=True,
                                 mininterval=self.throttle_s)
            except ImportError:
                self._bar = False
        if self._bar is not None and self._bar is not False:
            self._bar.set_postfix({("" if run == "default" else f"{run}/") + k: v for k, v in shown.items()},
                                  refresh=False)
            self._bar.update(1)
        else:
            print(f"[{self.title}] {run} step {int(rec['step'])}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))

    def load_history(self, run: Any, label: str = "default") -> None:
        """Prefill with the server's whole-run history of ``run`` (a model, run id or RunInfo) — after a kernel
        restart or a resume the curve shows every step, not just the ones since."""
        from .history import run_history

        sess = self._session()
        if sess is None:
            return
        self.history[label] = run_history(run, session=sess) + self.history.get(label, [])

    def rate(self) -> tuple[float | None, float | None]:
        """(steps per second of this curve's loop, seconds left when ``total`` is known)."""
        if len(self._times) < 2:
            return None, None
        sps = (len(self._times) - 1) / max(1e-9, self._times[-1] - self._times[0])
        left = None if self.total is None else max(0, self.total - len(self._times)) / sps if sps > 0 else None
        return sps, left

    def _footer(self) -> str:
        sps, left = self.rate()
        if sps is None:
            return ""
        eta = f" · ETA {_duration(left)}" if left and not self.stopped else ""
        lat = f" · {self.latency_text()}" if self.latency else ""
        return f"{len(self._times)} steps here · {sps:.2f} steps/s{eta}{lat}"

    def chart_obj(self) -> Any:
        """The current curve as a :class:`twinkle_client.history.Chart` (PNG/SVG/frame)."""
        from .history import Chart

        return Chart(self.history, self.metrics, title=self.title, smoothing=self.smoothing, log_y=self.log_y,
                     footer=self._footer())

    def refresh(self) -> None:
        """Redraw now (the widget's model state gets every point logged so far)."""
        self._last_draw = time.monotonic()
        self._dirty = False
        if self.mode != "widget":
            return
        self.chart.value = self.chart_obj().svg()
        self.widget.data = {run: [dict(p) for p in pts] for run, pts in self.history.items()}
        last = {run: pts[-1] for run, pts in self.history.items() if pts}
        text = " · ".join(f"<b>{html.escape(r)}</b> step {int(p['step'])}"
                          + "".join(f", {html.escape(m)} {p[m]:.4g}" for m in self.metrics if m in p)
                          for r, p in last.items())
        if self.latency:
            text += (f"<br><span class='twk-latency' title='this session’s last step: waiting in the server’s "
                     f"queue, executing, and the rest (ordering, transport, client)'>"
                     f"{html.escape(self.latency_text())}{_latency_bar(self.latency[-1])}</span>")
        if self.stop_message:
            text += f" — <i>{html.escape(self.stop_message)}</i>"
        elif self.stopped:
            text += " — <i>stopping after this step</i>"
        self.status.value = text

    # ---- loop control --------------------------------------------------------------------------------------
    def _session(self) -> Any:
        from .session import current_session

        return self.session if self.session is not None else current_session(required=False)

    def stop(self, why: str = "Stop pressed") -> None:
        """Ask the loop to end after the step in progress (what the Stop button and Ctrl-C do)."""
        if not self._stop.is_set():
            self.stop_reason = why
        self._stop.set()
        if self.mode == "widget":
            self.stop_button.disabled = True
            self.refresh()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _server_stop(self, sess: Any) -> bool:
        return sess is not None and sess.stop_requested.is_set()

    def iterate(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yield items until exhausted or stopped; the item being processed when Stop is pressed completes.

        Stop comes from the widget's button, the JupyterLab panel or ``%twinkle stop`` (through the server, read
        from the replies of the loop's own training calls), or Ctrl-C (a second Ctrl-C interrupts at once)."""
        from ._stop import sigint_stops

        if self.total is None and hasattr(iterable, "__len__"):
            self.total = len(iterable)  # type: ignore[arg-type]
        sess = self._session()
        if sess is not None:
            sess.clear_stop()  # a Stop pressed before this loop began is not meant for it
        self._t0 = time.monotonic()
        done = 0
        try:
            with sigint_stops(lambda: self.stop("Ctrl-C")):
                for item in iterable:
                    if not self.stopped and self._server_stop(sess):
                        self.stop("Stop requested")
                    if self.stopped:
                        self._report_stop(done, sess)
                        break
                    yield item
                    done += 1
        finally:
            self.close()

    def _report_stop(self, done: int, sess: Any) -> None:
        if sess is not None and (sess.stop_requested.is_set() or self.stop_reason != "Ctrl-C"):
            sess.clear_stop()
        last = max((int(p[-1]["step"]) for p in self.history.values() if p), default=None)
        where = f"step {last}" if last is not None else f"{done} iterations"
        self.stop_message = (f"stopped after {where} ({self.stop_reason}); the step in flight completed and the "
                             "run is intact — run the cell again to continue")
        print(self.stop_message)
        if self.mode == "widget":
            self.refresh()

    def range(self, n: int) -> Iterator[int]:
        self.total = n
        return self.iterate(range(n))

    def close(self) -> None:
        """End of the loop: the live widget is replaced by a PNG of the final curve, so the saved notebook shows
        it everywhere (GitHub, nbviewer, untrusted JupyterLab); ``show()`` brings the interactive view back."""
        for lg in self.loggers:
            lg.flush()
        if self.mode == "widget":
            self.refresh()
            self.stop_button.disabled = True
            if self._handle is not None and self.history:
                self._handle.update(self._repr_mimebundle_(), raw=True)
        elif self._bar is not None and self._bar is not False:
            self._bar.close()
            self._bar = None

    def show(self) -> None:
        """Display the interactive chart again (hover values, the same smoothing and scale)."""
        self.chart_obj().show()

    def frame(self) -> Any:
        """All logged points as a pandas DataFrame (columns: run, step, metrics…)."""
        rows = [{"run": run, **p} for run, pts in self.history.items() for p in pts]
        return _frame(rows)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        """A PNG (+ a text line): renders in any notebook viewer, trusted or not."""
        return self.chart_obj()._repr_mimebundle_()


def _secs(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _latency_bar(split: dict[str, float], width: int = 160) -> str:
    """A small stacked bar: queue (amber), execution (blue), other (grey), proportional to the step's total."""
    total = max(1e-9, split["queue_s"] + split["exec_s"] + split["other_s"])
    parts = [("queue", split["queue_s"], "#f0ad4e"), ("execution", split["exec_s"], "#1f77b4"),
             ("other", split["other_s"], "#bbbbbb")]
    cells = "".join(
        f"<span class='twk-lat-{name}' title='{name} {_secs(v)}' style='display:inline-block;height:8px;"
        f"width:{max(0.0, v / total * width):.1f}px;background:{color}'></span>" for name, v, color in parts)
    return f" <span style='display:inline-block;vertical-align:middle;white-space:nowrap'>{cells}</span>"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ---- samples -----------------------------------------------------------------------------------------------------


_IMAGE_MIME = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "gif": "image/gif",
               "webp": "image/webp"}
_MAX_INLINE_IMAGE = 4 << 20  # base64 characters; bigger prompt images are not inlined into the notebook
_B64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")


def image_data_uri(chunk: ImageChunk) -> str | None:
    """``data:image/...;base64,...`` for an image chunk (None: an unknown format, not base64, or too large)."""
    mime = _IMAGE_MIME.get(chunk.format.lower())
    data = "".join(chunk.data.split())
    if mime is None or not data or len(data) > _MAX_INLINE_IMAGE or not _B64.match(data):
        return None
    return f"data:{mime};base64,{data}"


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


class _HtmlBox:
    """What the sample viewer last rendered (``.value``), kept for tests and ``SampleViewer.html()``."""

    value = ""


def render_samples_table(samples: Sequence[dict[str, Any]]) -> str:
    """Samples as an HTML table (title, prompt, completion coloured by token probability, mean logprob, reward)."""
    e = html.escape
    rows = []
    for s in samples:
        lps = s.get("logprobs")
        mean = (sum(lps) / len(lps)) if lps else None
        reward = s.get("reward")
        spans = render_sample_html("", s["pieces"], lps).split("<div>", 2)[-1].rsplit("</div>", 2)[0]
        imgs = "".join(
            f"<img src='{uri}' alt='prompt image {i + 1}' style='max-height:96px;max-width:160px;"
            f"margin:0 4px 4px 0;vertical-align:top'>" for i, uri in enumerate(s.get("images") or []))
        rows.append(
            f"<tr><td>{e(s.get('title') or '')}</td><td style='color:#555'>"
            f"{f'<div>{imgs}</div>' if imgs else ''}{e(s['prompt'])}</td>"
            f"<td style='font-family:monospace'>{spans}</td>"
            f"<td>{'' if mean is None else f'{mean:.3f}'}</td>"
            f"<td>{'' if reward is None else f'reward <b>{reward:.3g}</b>'}</td></tr>")
    return ("<table class='twk-samples'><thead><tr><th></th><th>prompt</th><th>completion (colour: token "
            "probability)</th><th>mean logprob</th><th>reward</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table>")


class SampleViewer:
    """Shows samples (prompt, completion, per-token logprob heat-map, reward) under the cell; text elsewhere.

    In a notebook the samples are a plain HTML table updated in place (an IPython display handle, no widget):
    it renders while the cell runs and in the saved notebook anywhere — GitHub, nbviewer, untrusted JupyterLab
    (which keeps the table and the text even where it drops the colours)."""

    def __init__(self, tokenizer: Any = None, *, max_shown: int = 8, mode: str | None = None, display: bool = True):
        self.tokenizer = tokenizer
        self.max_shown = max_shown
        self.samples: list[dict[str, Any]] = []
        if mode is None:
            mode = "widget" if in_notebook() else "text"
        self.mode = mode
        self.widget = _HtmlBox() if self.mode == "widget" else None
        self._handle: Any = None
        if self.widget is not None and display:
            from IPython.display import HTML
            from IPython.display import display as _display

            self._handle = _display(HTML(self.widget.value or "<i>no samples yet</i>"), display_id=True)

    def _pieces(self, tokens: Sequence[int]) -> list[str]:
        if self.tokenizer is None:
            return [f"⟨{t}⟩" for t in tokens]
        return [self.tokenizer.decode([t]) for t in tokens]

    def _prompt_text(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens)) if self.tokenizer is not None else str(list(tokens))

    def add(self, prompt: Any, tokens: Sequence[int], logprobs: Sequence[float] | None = None,
            reward: float | None = None, title: str | None = None) -> None:
        """``prompt``: text, token ids, or a ``ModelInput`` — one with image chunks shows its images (inlined as
        data URIs, so the saved notebook shows them anywhere) beside the answer."""
        rec = self._record(prompt, tokens, logprobs, reward, title)
        if self.widget is not None:
            self._render()
        else:
            print(self._text_line(rec))

    def _record(self, prompt: Any, tokens: Sequence[int], logprobs: Sequence[float | None] | None,
                reward: float | None, title: str | None) -> dict[str, Any]:
        images: list[str] = []
        if isinstance(prompt, ModelInput):
            parts: list[str] = []
            for c in prompt.chunks:
                if isinstance(c, ImageChunk):
                    uri = image_data_uri(c)
                    if uri is not None:
                        images.append(uri)
                    parts.append("[image]")
                else:
                    parts.append(self._prompt_text(c.tokens))
            prompt = "".join(parts)
        elif not isinstance(prompt, str):
            prompt = self._prompt_text(prompt)
        rec = {"prompt": prompt, "tokens": list(tokens), "pieces": self._pieces(tokens),
               "logprobs": list(logprobs) if logprobs is not None else None, "reward": reward, "title": title,
               "images": images}
        self.samples.append(rec)
        return rec

    def _render(self) -> None:
        assert self.widget is not None
        self.widget.value = render_samples_table(self.samples[-self.max_shown:])
        if self._handle is not None:
            from IPython.display import HTML

            self._handle.update(HTML(self.widget.value))

    @staticmethod
    def _text_line(rec: dict[str, Any]) -> str:
        lps, reward, title, images = rec["logprobs"], rec["reward"], rec["title"], rec["images"]
        mean = (sum(lps) / len(lps)) if lps else None
        extra = "".join([f" reward={reward:.3g}" if reward is not None else "",
                         f" mean_logprob={mean:.3f}" if mean is not None else ""])
        pics = f"[{len(images)} image{'s' if len(images) != 1 else ''}] " if images else ""
        return f"{title + ': ' if title else ''}{pics}{rec['prompt']!r} -> {''.join(rec['pieces'])!r}{extra}"

    def add_stream(self, prompt: Any, events: Iterable[dict[str, Any]], *, rewards: Sequence[float] | None = None,
                   refresh_s: float = 0.1) -> Any:
        """Show a streamed sample as it is produced: ``events`` is ``Sampler.stream(...)``. In a notebook each
        sequence's row fills in token by token (redrawn at most every ``refresh_s``); in text mode the pieces
        print as they arrive. When the stream ends the rows take the final response's tokens and logprobs
        (and ``rewards``, if given), and that ``SampleResponse`` is returned (``None`` if the stream had none)."""
        rows: dict[int, dict[str, Any]] = {}
        final: Any = None
        last_draw = 0.0
        live_text = self.widget is None
        for ev in events:
            if "done" in ev:
                final = ev["done"]
                break
            i = int(ev.get("index", 0))
            rec = rows.get(i)
            if rec is None:
                rec = rows[i] = self._record(prompt, [], [], None, f"sample {i}")
                if live_text and i > 0:
                    live_text = False  # several sequences interleave: print whole lines at the end instead
            rec["tokens"].append(int(ev["token"]))
            rec["logprobs"].append(ev.get("logprob"))
            piece = ev.get("text")
            rec["pieces"].append(piece if isinstance(piece, str) else self._pieces([int(ev["token"])])[0])
            if live_text:
                print(rec["pieces"][-1], end="", flush=True)
            elif self.widget is not None and time.monotonic() - last_draw >= refresh_s:
                self._render()
                last_draw = time.monotonic()
        if live_text and rows:
            print()
        if final is not None:
            for i, seq in enumerate(final.sequences):
                rec = rows.get(i) or self._record(prompt, [], [], None, f"sample {i}")
                rec["tokens"], rec["logprobs"] = list(seq.tokens), list(seq.logprobs) if seq.logprobs else None
                rec["pieces"] = self._pieces(seq.tokens)
                rec["reward"] = None if rewards is None else rewards[i]
                rows[i] = rec
        if self.widget is not None:
            self._render()
        elif not live_text:
            for i in sorted(rows):
                print(self._text_line(rows[i]))
        return final

    def add_response(self, prompt: str | Sequence[int], response: Any, rewards: Sequence[float] | None = None) -> None:
        """Add every sequence of a ``SampleResponse``."""
        for i, seq in enumerate(response.sequences):
            self.add(prompt, seq.tokens, seq.logprobs, None if rewards is None else rewards[i], title=f"sample {i}")

    def frame(self) -> Any:
        return _frame([{k: v for k, v in s.items() if k != "pieces"} for s in self.samples])
