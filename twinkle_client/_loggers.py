"""Optional loggers: ``LiveCurve(..., log_to="tensorboard" | "wandb" | "mlflow")`` writes the same metrics to
the tool a team already uses, when that package is installed (a clear error names the package otherwise)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from twinkle.types import InvalidInputError

__all__ = ["open_loggers"]


class _TensorBoard:
    def __init__(self, title: str):
        try:
            from torch.utils.tensorboard import SummaryWriter  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            try:
                from tensorboardX import SummaryWriter  # type: ignore[import-not-found,import-untyped,no-redef,unused-ignore]
            except ImportError:
                raise InvalidInputError("log_to='tensorboard' needs the tensorboard package (pip install "
                                        "tensorboard) or tensorboardX", field="log_to") from None
        self._writer_class = SummaryWriter
        self.logdir = os.path.join(os.environ.get("TWINKLE_TB_DIR", "runs"), re.sub(r"[^\w.-]+", "_", title))
        self.writer: Any = SummaryWriter(self.logdir)

    def log(self, run: str, rec: dict[str, float]) -> None:
        if self.writer is None:  # logging again after a flush: a new event file in the same directory
            self.writer = self._writer_class(self.logdir)
        step = int(rec["step"])
        for k, v in rec.items():
            if k != "step":
                self.writer.add_scalar(f"{run}/{k}", v, step)

    def flush(self) -> None:
        # tensorboardX's flush() leaves queued events to its writer thread; close() writes every one of them
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _WandB:
    def __init__(self, title: str):
        try:
            import wandb  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise InvalidInputError("log_to='wandb' needs the wandb package (pip install wandb)",
                                    field="log_to") from None
        self.wandb = wandb
        self.run = wandb.run or wandb.init(project=os.environ.get("WANDB_PROJECT", "twinkle"), name=title)

    def log(self, run: str, rec: dict[str, float]) -> None:
        # not committed yet: several runs of one chart (compare) log the same step
        self.run.log({f"{run}/{k}": v for k, v in rec.items() if k != "step"}, step=int(rec["step"]))

    def flush(self) -> None:
        self.run.log({}, commit=True)  # wandb keeps a step given explicitly open until a later one: close it


class _MLflow:
    def __init__(self, title: str):
        try:
            import mlflow  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise InvalidInputError("log_to='mlflow' needs the mlflow package (pip install mlflow)",
                                    field="log_to") from None
        self.mlflow = mlflow
        if mlflow.active_run() is None:
            mlflow.start_run(run_name=title)

    def log(self, run: str, rec: dict[str, float]) -> None:
        self.mlflow.log_metrics({f"{run}.{k}": v for k, v in rec.items() if k != "step"}, step=int(rec["step"]))

    def flush(self) -> None:
        pass


_KINDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


def open_loggers(log_to: str | Sequence[str] | None, title: str) -> list[Any]:
    if not log_to:
        return []
    names = [log_to] if isinstance(log_to, str) else list(log_to)
    out = []
    for n in names:
        kind = _KINDS.get(str(n).lower())
        if kind is None:
            raise InvalidInputError(f"log_to={n!r}: use one of {', '.join(_KINDS)}", field="log_to")
        out.append(kind(title))
    return out
