"""A small in-memory ``Service`` for testing the Tinker routes without a model.

Behaviour is simple but checkable: each run has a scalar ``scale``; a token's logprob is
``-scale * (1 + token % 3) / 4``; ``forward_backward`` accumulates a pending update (``forward_only`` does
not) and ``optim_step`` applies it (scale shrinks by ``lr`` per accumulated datum), so the loss falls and a
gradient applied twice is visible.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from twinkle.loss import list_losses
from twinkle.server.ops import ForwardBackwardOp, LoadOp, OptimStepOp, SampleOp, SaveOp
from twinkle.server.service import Service, User
from twinkle.types import (
    AuthenticationError,
    ForwardBackwardOutput,
    GoneError,
    InvalidInputError,
    LoraConfig,
    NotFoundError,
    OptimStepResponse,
    SampledSequence,
    SampleResponse,
    TensorData,
)
from twinkle.types.api import (
    BaseModelInfo,
    Capabilities,
    CheckpointInfo,
    FutureRef,
    FutureState,
    RunInfo,
    ServerStatus,
    SessionInfo,
)

VOCAB = 50
LOSSES = set(list_losses())  # the registry (ForwardBackwardOp has already checked the name)


class FakeService(Service):
    def __init__(self, tokenizer_id: str | None = None) -> None:
        self.keys = {"tml-test": User("alice", "k1"), "plain-key": User("alice", "k2"), "tml-bob": User("bob", "k3")}
        self.sessions: dict[str, SessionInfo] = {}
        self.runs: dict[str, RunInfo] = {}
        self.scale: dict[str, float] = {}
        self.pending: dict[str, float] = {}
        self.futures: dict[str, FutureState] = {}
        self.done: dict[str, asyncio.Event] = {}
        self.by_seq: dict[tuple[str, int], str] = {}
        self.checkpoints: dict[str, CheckpointInfo] = {}
        self.ck_scale: dict[str, float] = {}
        self.samplers: dict[str, dict[str, Any]] = {}
        self.applied: list[tuple[str, str]] = []  # (run_id, op type) in execution order
        self.tokenizer_id = tokenizer_id
        self._ids = itertools.count(1)

    # ---- helpers
    def _future(self, kind: str, result: Any = None, error: dict[str, Any] | None = None, run_id: str | None = None) -> FutureRef:
        fid = f"f{next(self._ids)}"
        self.futures[fid] = FutureState(
            future_id=fid, status="failed" if error else "complete", type=kind, result=result, error=error
        )
        return FutureRef(future_id=fid, run_id=run_id)

    def _run(self, user: User, run_id: str) -> RunInfo:
        run = self.runs.get(run_id)
        if run is None or run.user != user.name:
            raise NotFoundError(f"run {run_id} not found", field="model_id")
        return run

    @staticmethod
    def lp(scale: float, tok: int) -> float:
        return -scale * (1 + tok % 3) / 4

    # ---- auth / sessions
    def authenticate(self, api_key: str | None) -> User:
        if api_key not in self.keys:
            raise AuthenticationError("unknown API key")
        return self.keys[api_key]

    async def create_session(self, user, *, client="twinkle", metadata=None, tags=None, lease_seconds=None):
        sid = f"s{next(self._ids)}"
        now = time.time()
        info = SessionInfo(session_id=sid, user=user.name, client=client, state="active", created_at=now,
                           last_heartbeat=now, lease_seconds=60.0, metadata=dict(metadata or {}))
        self.sessions[sid] = info
        return info

    async def heartbeat(self, user, session_id):
        s = await self.get_session(user, session_id)
        if s.state != "active":
            raise GoneError("session closed")
        return s

    async def get_session(self, user, session_id):
        s = self.sessions.get(session_id)
        if s is None or s.user != user.name:
            raise NotFoundError("no such session", field="session_id")
        s.run_ids = [r for r, info in self.runs.items() if info.session_id == session_id]
        return s

    async def list_sessions(self, user):
        return [s for s in self.sessions.values() if s.user == user.name]

    async def close_session(self, user, session_id, reason="closed"):
        s = await self.get_session(user, session_id)
        s.state = "closed"
        return s

    # ---- runs
    async def create_run(self, user, *, session_id, base_model, lora, run_id=None, name=None, metadata=None):
        await self.get_session(user, session_id)
        if base_model != "fake/base":
            raise InvalidInputError(f"unknown base model {base_model}", field="base_model")
        run_id = run_id or f"{session_id}:train:{len(self.runs)}"
        run = RunInfo(run_id=run_id, session_id=session_id, user=user.name, base_model=base_model, lora=lora,
                      state="active", created_at=time.time(), metadata=dict(metadata or {}))
        self.runs.setdefault(run_id, run)
        self.scale.setdefault(run_id, 1.0)
        self.pending.setdefault(run_id, 0.0)
        return self._future("create_run", self.runs[run_id], run_id=run_id)

    async def get_run(self, user, run_id):
        return self._run(user, run_id)

    async def list_runs(self, user, *, limit=100, offset=0):
        mine = [r for r in self.runs.values() if r.user == user.name]
        return mine[offset : offset + limit], len(mine)

    async def delete_run(self, user, run_id):
        return self._run(user, run_id)

    async def submit(self, user, run_id, op, *, seq_id=None):
        run = self._run(user, run_id)
        if seq_id is not None and (run_id, seq_id) in self.by_seq:
            return FutureRef(future_id=self.by_seq[(run_id, seq_id)], run_id=run_id)
        if isinstance(op, ForwardBackwardOp):
            if op.loss_fn not in LOSSES:
                raise InvalidInputError(f"unknown loss_fn {op.loss_fn!r}", field="loss_fn")
            outs, loss = [], 0.0
            for i, d in enumerate(op.data):
                toks = d.model_input.to_ints()
                if "target_tokens" not in d.loss_fn_inputs:
                    raise InvalidInputError(f"data[{i}] needs target_tokens", field=f"data[{i}].loss_fn_inputs.target_tokens")
                tgt = d.loss_fn_inputs["target_tokens"].to_numpy().reshape(-1)
                if any(t < 0 or t >= VOCAB for t in [*toks, *tgt.tolist()]):
                    raise InvalidInputError("token id outside the vocabulary", field=f"data[{i}].model_input")
                w = d.loss_fn_inputs["weights"].to_numpy() if "weights" in d.loss_fn_inputs else [1.0] * len(tgt)
                lps = [self.lp(self.scale[run_id], int(t)) for t in tgt]
                loss += -sum(float(a) * float(b) for a, b in zip(lps, w, strict=True))
                outs.append({"logprobs": TensorData.from_numpy(__import__("numpy").asarray(lps, dtype="float32"))})
            if not op.forward_only:
                self.pending[run_id] += len(op.data)
            self.applied.append((run_id, "fwd" if op.forward_only else "fb"))
            res = ForwardBackwardOutput(loss_fn_outputs=outs, metrics={"loss:sum": loss})
            ref = self._future("forward_backward", res, run_id=run_id)
        elif isinstance(op, OptimStepOp):
            lr = op.adam_params.learning_rate if op.adam_params else 0.1
            self.scale[run_id] *= max(0.0, 1.0 - lr * self.pending[run_id])
            self.pending[run_id] = 0.0
            run.step += 1
            self.applied.append((run_id, "opt"))
            ref = self._future("optim_step", OptimStepResponse(metrics={"lr": lr}), run_id=run_id)
        elif isinstance(op, SaveOp):
            kind_dir = "weights" if op.kind == "training" else "sampler_weights"
            path = f"tinker://{run_id}/{kind_dir}/{op.name}"
            if path in self.checkpoints and not op.overwrite:
                raise InvalidInputError(f"checkpoint {op.name} exists", field="path")
            ck = CheckpointInfo(checkpoint_id=f"{kind_dir}/{op.name}", run_id=run_id, name=op.name, kind=op.kind,
                                path=path, created_at=time.time(), step=run.step)
            self.checkpoints[path] = ck
            self.ck_scale[path] = self.scale[run_id]
            ref = self._future("save", ck, run_id=run_id)
        elif isinstance(op, LoadOp):
            ck = await self.get_checkpoint(user, op.checkpoint)
            self.scale[run_id] = self.ck_scale[ck.path]
            ref = self._future("load", ck, run_id=run_id)
        else:
            raise InvalidInputError(f"unsupported op {op!r}", field="type")
        if seq_id is not None:
            self.by_seq[(run_id, seq_id)] = ref.future_id
        return ref

    async def resume_run(self, user, *, session_id, checkpoint, optimizer=True, run_id=None, metadata=None):
        ck = await self.get_checkpoint(user, checkpoint)
        src = self._run(user, ck.run_id)
        ref = await self.create_run(user, session_id=session_id, base_model=src.base_model, lora=LoraConfig(rank=src.lora.rank),
                                    run_id=run_id, metadata=metadata)
        self.scale[ref.run_id] = self.ck_scale[ck.path]
        return ref

    # ---- sampling
    async def create_sampler(self, user, *, session_id, sampler_id=None, base_model=None, checkpoint=None, run_id=None):
        scale = 1.0
        if checkpoint:
            ck = await self.get_checkpoint(user, checkpoint)
            base_model = self.runs[ck.run_id].base_model
            scale = self.ck_scale[ck.path]
        out = {"sampler_id": sampler_id, "base_model": base_model, "model_path": checkpoint, "scale": scale}
        self.samplers[sampler_id] = out
        return out

    async def get_sampler(self, user, sampler_id):
        if sampler_id not in self.samplers:
            raise NotFoundError("no such sampler", field="sampler_id")
        return self.samplers[sampler_id]

    async def sample(self, user, op: SampleOp, *, sampler_id=None, base_model=None, run_id=None, checkpoint=None):
        if sampler_id is not None:
            await self.get_sampler(user, sampler_id)
        n = op.params.max_tokens or 4
        seqs = []
        for i in range(op.num_samples):
            toks = [(op.prompt[-1] + j + 1 + (i if op.params.temperature > 0 else 0)) % VOCAB for j in range(n)]
            seqs.append(SampledSequence(stop_reason="length", tokens=toks, logprobs=[-0.5] * n))
        plp = [None] + [self.lp(1.0, t) for t in op.prompt[1:]] if op.prompt_logprobs else None
        topk = None
        if op.topk_prompt_logprobs:
            topk = [None] + [[(t, -0.1), (t + 1, -2.0)][: op.topk_prompt_logprobs] for t in op.prompt[1:]]
        return self._future("sample", SampleResponse(sequences=seqs, prompt_logprobs=plp, topk_prompt_logprobs=topk))

    # ---- futures / checkpoints / server
    async def wait(self, user, future_id, timeout=30.0):
        if future_id not in self.futures:
            raise NotFoundError("no such future", field="request_id")
        return self.futures[future_id]

    async def list_checkpoints(self, user, run_id=None):
        return [c for c in self.checkpoints.values()
                if self.runs[c.run_id].user == user.name and (run_id is None or c.run_id == run_id)]

    async def get_checkpoint(self, user, path):
        ck = self.checkpoints.get(path)
        if ck is None or (self.runs[ck.run_id].user != user.name and not ck.public):
            raise NotFoundError(f"checkpoint {path} not found", field="path")
        return ck

    async def delete_checkpoint(self, user, run_id, checkpoint_id):
        path = f"tinker://{run_id}/{checkpoint_id}"
        ck = await self.get_checkpoint(user, path)
        del self.checkpoints[path]
        return ck

    async def set_checkpoint_ttl(self, user, run_id, checkpoint_id, ttl_seconds):
        ck = await self.get_checkpoint(user, f"tinker://{run_id}/{checkpoint_id}")
        ck.expires_at = None if ttl_seconds is None else time.time() + ttl_seconds
        return ck

    async def set_checkpoint_public(self, user, run_id, checkpoint_id, public):
        ck = await self.get_checkpoint(user, f"tinker://{run_id}/{checkpoint_id}")
        ck.public = public
        return ck

    def capabilities(self):
        return Capabilities(version="test", base_models=[BaseModelInfo(
            name="fake/base", backend="mock", vocab_size=VOCAB, max_length=128, max_lora_rank=64, max_adapters=8,
            max_tokens_per_request=4096, tokenizer_id=self.tokenizer_id)])

    async def status(self):
        return ServerStatus(version="test", uptime_s=0.0, sessions_active=0, runs_active=0, workers=[])
