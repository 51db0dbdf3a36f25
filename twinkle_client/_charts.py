"""Training curves as data → layout → SVG (live, with hover values) or PNG (static, renders anywhere).

One panel per metric (so loss, margin and accuracy of a DPO run never share a y-axis), several runs overlaid
in each panel, optional smoothing (TensorBoard's debiased exponential moving average, raw points drawn faint
underneath) and log scale. No matplotlib: the SVG is written by hand and the PNG drawn with Pillow.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Panel", "layout", "png_chart", "smooth", "svg_chart"]

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
Series = dict[str, list[tuple[float, float]]]  # run label -> [(step, value)]


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard-style debiased EMA (``weight`` 0 = raw, 0.9 = heavy). Non-finite values pass through."""
    if weight <= 0:
        return list(values)
    out, last, n = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        last = last * weight + (1 - weight) * v
        n += 1
        out.append(last / (1 - weight ** n))
    return out


@dataclass
class Panel:
    metric: str
    series: Series
    log: bool = False

    def finite(self) -> list[tuple[float, float]]:
        return [(x, y) for pts in self.series.values() for x, y in pts
                if math.isfinite(y) and (not self.log or y > 0)]


def layout(history: Mapping[str, Sequence[Mapping[str, float]]], metrics: Sequence[str], *,
           log_y: bool | Sequence[str] = False) -> list[Panel]:
    """``{run: [{"step", metric...}]}`` → one panel per metric that has data (in ``metrics`` order)."""
    panels = []
    for m in metrics:
        series = {run: [(float(p["step"]), float(p[m])) for p in pts if m in p] for run, pts in history.items()}
        series = {run: pts for run, pts in series.items() if pts}
        if series:
            log = log_y if isinstance(log_y, bool) else m in log_y
            panels.append(Panel(m, series, log=log))
    return panels


@dataclass
class _Frame:
    """Pixel geometry of one panel: data → pixels."""

    left: float
    top: float
    w: float
    h: float
    x0: float
    x1: float
    y0: float
    y1: float
    log: bool

    def sx(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * self.w

    def sy(self, y: float) -> float:
        if self.log:
            y = math.log10(max(y, 1e-300))
        return self.top + (1 - (y - self.y0) / (self.y1 - self.y0)) * self.h

    def ticks(self) -> list[float]:
        if self.log:
            return [10 ** v for v in (self.y0, (self.y0 + self.y1) / 2, self.y1)]
        return [self.y0, (self.y0 + self.y1) / 2, self.y1]


def _frame(panel: Panel, left: float, top: float, w: float, h: float) -> _Frame | None:
    pts = panel.finite()
    if not pts:
        return None
    xs = [p[0] for p in pts]
    ys = [math.log10(p[1]) if panel.log else p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    return _Frame(left, top, w, h, x0, x1, y0 - pad, y1 + pad, panel.log)


_PANEL_H = 170
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 12, 20, 24


def _panel_boxes(n: int, width: int) -> list[tuple[float, float, float, float]]:
    """Panels side by side when there are two or three, else stacked two per row."""
    cols = 1 if n == 1 else 2 if n in (2, 4) else 3 if n == 3 else 2
    pw = width / cols
    return [((i % cols) * pw + _LEFT, (i // cols) * _PANEL_H + _TOP, pw - _LEFT - _RIGHT, _PANEL_H - _TOP - _BOTTOM)
            for i in range(n)]


def chart_size(n_panels: int, width: int) -> tuple[int, int]:
    cols = 1 if n_panels == 1 else 2 if n_panels in (2, 4) else 3 if n_panels == 3 else 2
    rows = max(1, math.ceil(n_panels / cols))
    return width, rows * _PANEL_H + 22


def _label(v: float) -> str:
    return f"{v:.3g}"


def svg_chart(panels: list[Panel], *, title: str = "", width: int = 720, smoothing: float = 0.0,
              footer: str = "") -> str:
    """Inline SVG: one panel per metric, runs overlaid, hover a point for its step and value."""
    wd, ht = chart_size(len(panels), width)
    e = html.escape
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{wd}' height='{ht}' class='twk-chart' "
             f"style='font:11px sans-serif;background:#fff'>"]
    if not panels:
        parts.append(f"<text x='{_LEFT}' y='{ht // 2}' fill='#888'>{e(title)} — waiting for the first step…</text>")
    runs = list(dict.fromkeys(r for p in panels for r in p.series))
    for panel, (left, top, w, h) in zip(panels, _panel_boxes(len(panels), width), strict=True):
        fr = _frame(panel, left, top, w, h)
        head = f"{title} · {panel.metric}" if title else panel.metric
        parts.append(f"<text x='{left}' y='{top - 6}' font-weight='bold' class='twk-panel-title'>{e(head)}"
                     f"{' (log)' if panel.log else ''}</text>")
        parts.append(f"<rect x='{left}' y='{top}' width='{w}' height='{h}' fill='none' stroke='#ccc'/>")
        if fr is None:
            continue
        for v in fr.ticks():
            parts.append(f"<text x='{left - 4}' y='{fr.sy(v) + 4:.1f}' text-anchor='end'>{_label(v)}</text>")
        parts.append(f"<text x='{left}' y='{top + h + 14}'>{fr.x0:g}</text>"
                     f"<text x='{left + w}' y='{top + h + 14}' text-anchor='end'>{fr.x1:g}</text>")
        legend: list[str] = []  # under the panel, between the x labels: never over the data
        for i, run in enumerate(runs):
            pts = [(x, y) for x, y in panel.series.get(run, []) if math.isfinite(y) and (not panel.log or y > 0)]
            if not pts:
                continue
            color = COLORS[i % len(COLORS)]
            ys = smooth([y for _, y in pts], smoothing)
            if smoothing > 0:
                raw = " ".join(f"{fr.sx(x):.1f},{fr.sy(y):.1f}" for x, y in pts)
                parts.append(f"<polyline fill='none' stroke='{color}' stroke-opacity='0.25' points='{raw}'/>")
            line = " ".join(f"{fr.sx(x):.1f},{fr.sy(y):.1f}" for (x, _), y in zip(pts, ys, strict=True))
            parts.append(f"<polyline fill='none' stroke='{color}' stroke-width='1.8' points='{line}' "
                         f"data-run='{e(run)}' data-metric='{e(panel.metric)}' data-points='{len(pts)}'/>")
            # hover: an invisible dot per point (at most ~200 per line) with a native tooltip
            stride = max(1, len(pts) // 200)
            for (x, y), ysm in list(zip(pts, ys, strict=True))[::stride]:
                tip = f"{run} · step {x:g} · {panel.metric} {y:.5g}" + (f" (smoothed {ysm:.4g})" if smoothing else "")
                parts.append(f"<circle cx='{fr.sx(x):.1f}' cy='{fr.sy(ysm):.1f}' r='4' fill='{color}' "
                             f"fill-opacity='0' class='twk-hover'><title>{e(tip)}</title></circle>")
            legend.append(f"<tspan fill='{color}'>{e(run)}: {pts[-1][1]:.4g}  </tspan>")
        if legend:
            parts.append(f"<text x='{left + w / 2:.1f}' y='{top + h + 14}' text-anchor='middle' "
                         f"class='twk-legend'>{''.join(legend)}</text>")
    if footer:
        parts.append(f"<text x='{_LEFT}' y='{ht - 4}' fill='#555'>{e(footer)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def png_chart(panels: list[Panel], *, title: str = "", width: int = 720, smoothing: float = 0.0,
              footer: str = "") -> bytes:
    """The same chart as a PNG (Pillow): what a saved notebook shows on GitHub, nbviewer, untrusted Lab."""
    from PIL import Image, ImageDraw, ImageFont

    wd, ht = chart_size(len(panels), width)
    img = Image.new("RGB", (wd, ht), "white")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    if not panels:
        d.text((_LEFT, ht // 2), f"{title} — no data", fill="#888888", font=font)
    runs = list(dict.fromkeys(r for p in panels for r in p.series))
    for panel, (left, top, w, h) in zip(panels, _panel_boxes(len(panels), width), strict=True):
        head = (f"{title} · {panel.metric}" if title else panel.metric) + (" (log)" if panel.log else "")
        d.text((left, top - 16), head, fill="black", font=font)
        d.rectangle([left, top, left + w, top + h], outline="#cccccc")
        fr = _frame(panel, left, top, w, h)
        if fr is None:
            continue
        for v in fr.ticks():
            d.text((left - 4, fr.sy(v)), _label(v), fill="black", font=font, anchor="rm")
        d.text((left, top + h + 4), f"{fr.x0:g}", fill="black", font=font)
        d.text((left + w, top + h + 4), f"{fr.x1:g}", fill="black", font=font, anchor="ra")
        legend: list[tuple[str, str]] = []
        for i, run in enumerate(runs):
            pts = [(x, y) for x, y in panel.series.get(run, []) if math.isfinite(y) and (not panel.log or y > 0)]
            if not pts:
                continue
            color = COLORS[i % len(COLORS)]
            ys = smooth([y for _, y in pts], smoothing)
            if smoothing > 0 and len(pts) > 1:
                d.line([(fr.sx(x), fr.sy(y)) for x, y in pts], fill=_fade(color), width=1)
            xy = [(fr.sx(x), fr.sy(y)) for (x, _), y in zip(pts, ys, strict=True)]
            if len(xy) == 1:
                d.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=color)
            else:
                d.line(xy, fill=color, width=2)
            legend.append((f"{run}: {pts[-1][1]:.4g}  ", color))
        x = left + w / 2 - sum(d.textlength(t, font=font) for t, _ in legend) / 2  # centred under the panel
        for text, color in legend:
            d.text((x, top + h + 4), text, fill=color, font=font)
            x += d.textlength(text, font=font)
    if footer:
        d.text((_LEFT, ht - 16), footer, fill="#555555", font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _fade(color: str) -> str:
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{int(c + (255 - c) * 0.75):02x}" for c in (r, g, b))
