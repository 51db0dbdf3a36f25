"""What the server tells about itself: the served models and losses (``capabilities``), and the workers'
queues and batches (``status``)."""

from __future__ import annotations

import logging
from typing import Any

from twinkle.loss import describe_losses
from twinkle.types.api import BaseModelInfo, Capabilities, ServerStatus, WorkerStatus

from ..state.common import now as _now
from ..state.common import unwrap
from .context import Context

__all__ = ["VERSION", "capabilities", "status"]

log = logging.getLogger("twinkle.server")

VERSION = "0.1.0"


def capabilities(ctx: Context) -> Capabilities:
    models = []
    for m in ctx.config.models:
        info = ctx.model_info.get(m.served_name)
        models.append(BaseModelInfo(
            name=m.served_name, backend=m.backend, vocab_size=info.vocab_size if info else None,
            max_length=info.max_length if info else None, max_lora_rank=m.max_lora_rank,
            max_adapters=m.max_adapters * m.replicas, max_tokens_per_request=min(
                m.max_tokens_per_request, ctx.config.limits.max_tokens_per_request),
            tokenizer_id=info.tokenizer_id if info else None, replicas=m.replicas,
            vision=info.vision if info else None,
        ))
    return Capabilities(version=VERSION, base_models=models, losses=describe_losses())


async def status(ctx: Context) -> ServerStatus:
    await ctx.refresh_model_info()
    workers: list[WorkerStatus] = []
    for m in ctx.config.models:
        for i, w in enumerate(ctx.workers[m.served_name]):
            try:
                st: Any = await w.status()
            except Exception as e:
                log.warning("status of %s[%d] failed: %s", m.served_name, i, unwrap(e))
                st = {}
            if hasattr(st, "model_dump"):
                st = st.model_dump()
            st = dict(st or {})
            adapters = st.get("adapters", 0)
            if isinstance(adapters, (list, tuple)):
                adapters = len(adapters)
            workers.append(WorkerStatus(
                base_model=m.served_name, replica=i, adapters=int(adapters),
                queue_depth=int(st.get("queue_depth", 0) or 0), batches_run=int(st.get("batches_run", 0) or 0),
                last_batch=st.get("last_batch"), mixed_batches=int(st.get("mixed_batches", 0) or 0),
                max_adapters_in_batch=int(st.get("max_adapters_in_batch", 0) or 0),
                recent_batches=list(st.get("recent_batches") or []),
            ))
    return ServerStatus(
        version=VERSION, uptime_s=_now() - ctx.started_at,
        sessions_active=len(ctx.sessions.active),
        runs_active=len(ctx.runs.active),
        workers=workers,
    )
