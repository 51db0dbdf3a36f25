"""The scheduler's observer in a worker replica: feeds :class:`~.metrics.WorkerMetrics` and, when traces are
exported, :class:`~.tracing.WorkerTracing`. Imported only when telemetry is on."""

from __future__ import annotations

from typing import Any

from .metrics import WorkerMetrics

__all__ = ["WorkerObserver"]


class WorkerObserver:
    def __init__(self, metrics: WorkerMetrics, tracing: Any = None):
        self.metrics = metrics
        self.tracing = tracing

    def capture(self) -> Any:
        return self.tracing.capture() if self.tracing is not None else None

    def completed(self, done: list[tuple[Any, BaseException | None]], info: dict[str, Any] | None,
                  now: float) -> None:
        """Training requests delivered together (``info``: the batch they ran in, or None for a barrier)."""
        from ..ops import op_kind

        m = self.metrics
        for req, err in done:
            m.request_done(op_kind(req.op), req.arrived, req.started, now, err)
        if info is not None:
            lengths = [d.model_input.length for req, _ in done for d in req.op.data]
            m.batch(lengths, len(info["adapters"]), float(info["seconds"]))
        if self.tracing is not None:
            if info is not None:
                self.tracing.batch([r for r, _ in done], [e for _, e in done], float(info["seconds"]), now)
            else:
                for req, err in done:
                    self.tracing.request_done(op_kind(req.op), req, now, err)

    def sample_done(self, req: Any, err: BaseException | None, now: float) -> None:
        self.metrics.request_done("sample", req.arrived, req.started, now, err)
        if self.tracing is not None:
            self.tracing.request_done("sample", req, now, err)
