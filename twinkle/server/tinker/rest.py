"""Tinker REST routes: training runs, their checkpoints (list, delete, publish, TTL), weights_info."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse

from twinkle.types import InvalidInputError, NotFoundError
from twinkle.types.api import CheckpointInfo

from ..service import Service, User
from . import codec
from ._common import TinkerRoute, state_of, tinker_service, tinker_user
from .models import EmptyBody, SetTTLRequest, WeightsInfoRequest

__all__ = ["EXTERNAL_URL_TTL_S", "MAX_PAGE", "router"]

router = APIRouter(route_class=TinkerRoute, tags=["tinker: runs and checkpoints"])
_svc = Depends(tinker_service)
_who = Depends(tinker_user)

MAX_PAGE = 10000
EXTERNAL_URL_TTL_S = 3600.0
"""How long a signed external-weights download URL stays valid."""
_CKPT = "/training_runs/{run_id}/checkpoints/{checkpoint_id:path}"


async def _latest(service: Service, user: User, run_id: str) -> tuple[CheckpointInfo | None, CheckpointInfo | None]:
    cks = await service.list_checkpoints(user, run_id)
    train = [c for c in cks if c.kind == "training"]
    samp = [c for c in cks if c.kind == "sampler" and not c.name.startswith("ephemeral-")]

    def key(c: CheckpointInfo) -> float:
        return c.created_at

    return (max(train, key=key) if train else None, max(samp, key=key) if samp else None)


@router.get("/training_runs")
async def list_training_runs(limit: int = Query(20, ge=0, le=MAX_PAGE), offset: int = Query(0, ge=0),
                             access_scope: str | None = Query(None, max_length=64),
                             user: User = _who, service: Service = _svc) -> dict[str, Any]:
    runs, total = await service.list_runs(user, limit=limit, offset=offset)
    return {
        "training_runs": [codec.run_to_json(r) for r in runs],
        "cursor": {"offset": offset, "limit": limit, "total_count": total},
    }


@router.get("/training_runs/{run_id}")
async def get_training_run(run_id: str, user: User = _who, service: Service = _svc) -> dict[str, Any]:
    run = await service.get_run(user, run_id)
    last, last_s = await _latest(service, user, run_id)
    return codec.run_to_json(run, last_checkpoint=last, last_sampler=last_s)


@router.get("/training_runs/{run_id}/checkpoints")
async def list_checkpoints(run_id: str, user: User = _who, service: Service = _svc) -> dict[str, Any]:
    await service.get_run(user, run_id)  # 404 for an unknown / foreign run
    cks = await service.list_checkpoints(user, run_id)
    return {"checkpoints": [codec.checkpoint_to_json(c) for c in cks]}


@router.get(_CKPT + "/external_weights_urls")
async def external_weights_urls(run_id: str, checkpoint_id: str, request: Request, user: User = _who,
                                service: Service = _svc) -> dict[str, Any]:
    """Signed download URLs (valid ``EXTERNAL_URL_TTL_S``) for the files of an external weights export."""
    if not checkpoint_id.startswith("external_weights/"):
        raise InvalidInputError("only external_weights/<name> checkpoints have download URLs", field="checkpoint_id")
    await service.get_run(user, run_id)  # 404 for an unknown / foreign run
    ck = next((c for c in await service.list_checkpoints(user, run_id) if c.checkpoint_id == checkpoint_id), None)
    if ck is None:
        raise NotFoundError(f"checkpoint {checkpoint_id!r} of run {run_id!r} not found", field="checkpoint_id")
    directory = service.checkpoints.directory_of(ck)
    signer = state_of(service).url_signer(service)
    base = str(request.base_url).rstrip("/")
    urls, expires = {}, 0.0
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = f.relative_to(directory).as_posix()
        token, expires = signer.sign({"u": user.name, "p": ck.path, "f": rel}, EXTERNAL_URL_TTL_S)
        urls[rel] = f"{base}/api/v1/external_weights_files/{token}"
    return {"urls": urls, "expires": codec._iso(expires or None)}


@router.get("/external_weights_files/{token}")
async def external_weights_file(token: str, service: Service = _svc) -> Any:
    """A file of an external weights export, by a signed URL (no API key: the URL is the credential)."""
    claims = state_of(service).url_signer(service).verify(token)
    directory = service.checkpoints.readable_dir(str(claims.get("u")), str(claims.get("p")))
    f = (directory / str(claims.get("f"))).resolve()
    if directory not in f.parents or not f.is_file():
        raise NotFoundError("download link not found", field="token")
    return FileResponse(f, media_type="application/octet-stream", filename=f.name)


@router.post(_CKPT + "/publish")
async def publish(run_id: str, checkpoint_id: str, body: EmptyBody | None = None, user: User = _who,
                  service: Service = _svc) -> dict[str, Any]:
    await service.set_checkpoint_public(user, run_id, checkpoint_id, True)
    return {}


@router.delete(_CKPT + "/publish")
async def unpublish(run_id: str, checkpoint_id: str, user: User = _who, service: Service = _svc) -> dict[str, Any]:
    await service.set_checkpoint_public(user, run_id, checkpoint_id, False)
    return {}


@router.put(_CKPT + "/ttl")
async def set_ttl(run_id: str, checkpoint_id: str, body: SetTTLRequest, user: User = _who,
                  service: Service = _svc) -> dict[str, Any]:
    await service.set_checkpoint_ttl(user, run_id, checkpoint_id, body.ttl_seconds)
    return {}


@router.delete(_CKPT)
async def delete_checkpoint(run_id: str, checkpoint_id: str, user: User = _who,
                            service: Service = _svc) -> dict[str, Any]:
    await service.delete_checkpoint(user, run_id, checkpoint_id)
    return {}


@router.get("/checkpoints")
async def list_user_checkpoints(limit: int = Query(100, ge=0, le=MAX_PAGE), offset: int = Query(0, ge=0),
                                user: User = _who, service: Service = _svc) -> dict[str, Any]:
    cks = sorted(await service.list_checkpoints(user), key=lambda c: c.created_at, reverse=True)
    page = cks[offset : offset + limit]
    return {
        "checkpoints": [codec.checkpoint_to_json(c) for c in page],
        "cursor": {"offset": offset, "limit": limit, "total_count": len(cks)},
    }


@router.post("/weights_info")
async def weights_info(body: WeightsInfoRequest, user: User = _who, service: Service = _svc) -> dict[str, Any]:
    ck = await service.get_checkpoint(user, body.tinker_path)
    try:
        run = await service.get_run(user, ck.run_id)
    except NotFoundError:
        raise NotFoundError(f"training run of {body.tinker_path} is not visible", field="tinker_path") from None
    return {
        "base_model": run.base_model,
        "optimizer_config": {"type": "adamw"},
        "is_lora": True,
        "lora_rank": run.lora.rank,
        "train_unembed": run.lora.train_unembed,
        "train_mlp": run.lora.train_mlp,
        "train_attn": run.lora.train_attn,
    }
