"""Samplers (a base model, a checkpoint or a run's live weights) and sample requests: validation against the
model's limits, and what a request samples with (a run's adapter, a saved adapter or the base model)."""

from __future__ import annotations

from typing import Any, NamedTuple

from twinkle.model.images import expand_prompt
from twinkle.types import InvalidInputError, LimitExceededError, NotFoundError, SampleResponse
from twinkle.types.api import FutureRef, RunInfo

from ..ops import SampleOp
from ..state.checkpoints import Checkpoints
from ..state.identity import User
from ..state.samplers import Samplers
from ..worker_api import WorkerAPI
from .context import Context

__all__ = ["SampleTarget", "Sampling"]


class SampleTarget(NamedTuple):
    """What a sample request samples with (``Service.sample_target``)."""

    worker: WorkerAPI
    adapter_id: str | None
    checkpoint_dir: str | None
    after: Any  # an awaitable to wait for first (the run's adapter being ready), or None
    run: RunInfo | None
    run_id: str | None
    session_id: str | None
    base_model: str = ""  # the served model name (usage metering)


class Sampling:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def create_sampler(
        self, user: User, *, session_id: str, sampler_id: str | None = None,
        base_model: str | None = None, checkpoint: str | None = None, run_id: str | None = None,
    ) -> dict[str, Any]:
        """Register a sampler (base model, a checkpoint path, or a run's live weights).
        Returns ``{"sampler_id", "base_model", "model_path"}``."""
        ctx = self.ctx
        s = ctx.sessions.get_active(user, session_id)
        sampler_id, old = ctx.samplers.claim_id(user, s, sampler_id)
        if old is not None:
            return Samplers.public(old)
        model_path = None
        if checkpoint is not None:
            ck = ctx.checkpoints.resolve(user, checkpoint)
            _, bm = Checkpoints.model_of(ck, ctx.runs.by_id.get(ck.info.run_id))
            if base_model is not None and ctx.model_cfg(base_model).served_name != bm:
                raise InvalidInputError(f"checkpoint {checkpoint!r} belongs to base model {bm!r}", field="base_model")
            base_model, model_path = bm, ck.info.path
        elif run_id is not None:
            base_model = ctx.runs.get_active(user, run_id).base_model
        elif base_model is None:
            raise InvalidInputError("give base_model, checkpoint or run_id", field="base_model")
        m = ctx.model_cfg(base_model)
        return Samplers.public(ctx.samplers.add(user, s, sampler_id, m.served_name, model_path, run_id))

    def sample(
        self, user: User, op: SampleOp, *, sampler_id: str | None = None, base_model: str | None = None,
        run_id: str | None = None, checkpoint: str | None = None, session_id: str | None = None,
    ) -> FutureRef:
        ctx = self.ctx
        stop_of = None
        if session_id is not None:  # the caller's own session (a pending Stop rides on the reply)
            stop_of = ctx.sessions.by_id.get(session_id)
            if stop_of is None or stop_of.user != user.name:
                raise NotFoundError(f"session {session_id!r} not found", field="session_id")
        t = self.sample_target(user, op, sampler_id=sampler_id, base_model=base_model, run_id=run_id,
                               checkpoint=checkpoint)
        worker, adapter_id, ck_dir, run = t.worker, t.adapter_id, t.checkpoint_dir, t.run

        async def _go() -> Any:
            out = await worker.sample(op, adapter_id=adapter_id, checkpoint_path=ck_dir)
            out = out if isinstance(out, SampleResponse) else SampleResponse.model_validate(out)
            ctx.meter(user.name, t.base_model, prefilled=len(op.prompt),
                      sampled=sum(len(seq.tokens) for seq in out.sequences))
            return out

        ref = ctx.spawn(user, "sample", t.run_id, _go() if run is None else ctx.guard(run, _go), after=t.after,
                        session_id=t.session_id, base_model=t.base_model)
        # a loop that only samples sees the panel's Stop too
        if stop_of is None and t.session_id:
            stop_of = ctx.sessions.by_id.get(t.session_id)
        ctx.touch_session(t.session_id)
        return ctx.with_stop(ref, stop_of)

    def sample_target(
        self, user: User, op: SampleOp, *, sampler_id: str | None = None, base_model: str | None = None,
        run_id: str | None = None, checkpoint: str | None = None,
    ) -> SampleTarget:
        """Validate a sample request (``op`` gets its defaults) and resolve what it samples with. Another
        user's run or checkpoint is a 404. Used by ``sample`` and the streaming/OpenAI routes."""
        ctx = self.ctx
        session_id: str | None = None
        if sampler_id is not None:
            row = ctx.samplers.row(user, sampler_id)
            base_model, run_id, checkpoint = row["base_model"], row.get("run_id"), row.get("model_path")
            session_id = row.get("session_id")
        adapter_id: str | None = None
        ck_dir: str | None = None
        replica: int | None = None
        after = None
        run: RunInfo | None = None
        if run_id is not None:
            run = ctx.runs.get_active(user, run_id)
            ctx.check_rollback(run)
            base_model, adapter_id = run.base_model, run.run_id
            session_id = session_id or run.session_id
            replica = ctx.runs.replica(run)
            after = ctx.runs.extra[run.run_id].ready
        elif checkpoint is not None:
            ck = ctx.checkpoints.resolve(user, checkpoint)
            _, bm = Checkpoints.model_of(ck, ctx.runs.by_id.get(ck.info.run_id))
            base_model, ck_dir = bm, ck.dir
        if base_model is None:
            raise InvalidInputError("give sampler_id, base_model, run_id or checkpoint", field="base_model")
        m = ctx.model_cfg(base_model)
        if not op.prompt:
            raise InvalidInputError("prompt must hold at least one token", field="prompt")
        op.scope = user.name  # shared prompt caches stay within one user (``twinkle.sampler._prefix``)
        op.prompt, op.images = expand_prompt(op.prompt, ctx.model_info.get(m.served_name), m.served_name)
        ctx.check_tokens(m, len(op.prompt), "prompt")
        if op.num_samples < 1 or op.num_samples > m.sampler.max_num_samples:
            raise LimitExceededError(
                f"num_samples {op.num_samples} is outside 1..{m.sampler.max_num_samples}", field="num_samples"
            )
        params = op.params
        if params.max_tokens is None:
            op.params = params = params.model_copy(update={"max_tokens": m.sampler.default_max_tokens})
        if params.max_tokens is not None and params.max_tokens > m.sampler.max_tokens:
            raise LimitExceededError(
                f"max_tokens {params.max_tokens} exceeds this model's limit {m.sampler.max_tokens}",
                field="sampling_params.max_tokens",
            )
        if replica is None:
            replica = ctx.runs.least_loaded_replica(m.served_name, len(ctx.workers[m.served_name]))
        worker = ctx.worker(m.served_name, replica)
        return SampleTarget(worker, adapter_id, ck_dir, after, run, run_id, session_id, m.served_name)
