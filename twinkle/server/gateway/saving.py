"""Saving and loading a run's checkpoints (``save``/``load`` training ops, the automatic checkpoint of an
unloaded run) and the checkpoint pages of the API (list, read, delete, TTL, publication)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Coroutine
from typing import Any

from twinkle.types import InvalidInputError
from twinkle.types.api import CheckpointInfo, RunInfo

from ..ops import LoadOp, SaveOp
from ..state.checkpoints import Checkpoints
from ..state.identity import User
from ..worker_api import WorkerAPI
from .context import Context

__all__ = ["Saving"]


class Saving:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    async def save(self, run: RunInfo, worker: WorkerAPI, op: SaveOp, seq_id: int | None) -> CheckpointInfo:
        """Write ``run``'s checkpoint ``op.name`` and record it."""
        checkpoints = self.ctx.checkpoints
        key = Checkpoints.key(run, op)
        d = checkpoints.directory(run, op.kind, op.name)
        if not op.overwrite and key not in checkpoints.by_key and d.exists():
            # a directory no checkpoint record points at (left by an old process): replacing it loses nothing
            op = dataclasses.replace(op, overwrite=True)
        # The worker writes into a temporary sibling and renames it into place (replacing the old checkpoint
        # only once the new one is complete), so a failed save never loses an existing checkpoint.
        out = await worker.execute(run.run_id, op, seq_id=seq_id, path=str(d))
        size = out.get("size_bytes") if isinstance(out, dict) else None
        if size is None and d.exists():
            size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        info = checkpoints.record(run, op, d, size, run.step)
        if op.kind == "training":
            run.last_checkpoint = info.path
            self.ctx.runs.extra[run.run_id].dirty = False
        self.ctx.runs.record(run, "save", {})
        return info.model_copy()

    def prepare_save(
        self, run: RunInfo, worker: WorkerAPI, op: SaveOp, seq_id: int | None, *, replay: bool,
    ) -> Callable[[], Coroutine[Any, Any, Any]]:
        """Validate a ``save`` op of ``run``; returns the coroutine function that executes it."""
        key = Checkpoints.key(run, op)
        if key in self.ctx.checkpoints.by_key and not op.overwrite and not replay:
            raise InvalidInputError(
                f"checkpoint {op.name!r} of run {run.run_id!r} already exists (pass overwrite=true)", field="name"
            )

        async def _go() -> Any:
            return await self.save(run, worker, op, seq_id)
        return _go

    def prepare_load(
        self, user: User, run: RunInfo, worker: WorkerAPI, op: LoadOp, seq_id: int | None,
    ) -> Callable[[], Coroutine[Any, Any, Any]]:
        """Validate a ``load`` op of ``run`` (the checkpoint must be readable by ``user``)."""
        runs = self.ctx.runs
        extra = runs.extra[run.run_id]
        ck = self.ctx.checkpoints.resolve(user, op.checkpoint, run=run)

        async def _go() -> Any:
            await worker.execute(run.run_id, op, seq_id=seq_id, path=ck.dir)
            if op.optimizer:
                run.step = ck.info.step
            extra.dirty = True
            runs.record(run, "load", {})
            return {"run_id": run.run_id, "path": ck.info.path, "model_id": run.run_id, "step": run.step}
        return _go

    # ---- the checkpoint pages ------------------------------------------------------------------------------
    def list_checkpoints(self, user: User, run_id: str | None = None) -> list[CheckpointInfo]:
        if run_id is not None:
            self.ctx.runs.get(user, run_id)
        return self.ctx.checkpoints.list(user, run_id)

    def delete_checkpoint(self, user: User, run_id: str, checkpoint_id: str) -> CheckpointInfo:
        key, ck = self.ctx.checkpoints.own(user, run_id, checkpoint_id)
        self.ctx.checkpoints.drop(key)
        return ck.info.model_copy()

    def set_checkpoint_ttl(self, user: User, run_id: str, checkpoint_id: str, ttl_seconds: float | None) -> CheckpointInfo:
        key, ck = self.ctx.checkpoints.own(user, run_id, checkpoint_id)
        self.ctx.checkpoints.set_ttl(key, ck, ttl_seconds)
        return ck.info.model_copy()

    def set_checkpoint_public(self, user: User, run_id: str, checkpoint_id: str, public: bool) -> CheckpointInfo:
        _, ck = self.ctx.checkpoints.own(user, run_id, checkpoint_id)
        ck.info.public = bool(public)
        self.ctx.checkpoints.save(ck)
        return ck.info.model_copy()
