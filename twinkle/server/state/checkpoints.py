"""Checkpoints: ``tinker://{run_id}/{weights|sampler_weights}/{name}`` → a directory under the checkpoint root.

Keyed by ``(run_id, kind, name)``; indexed per user; an expiry heap drops checkpoints whose TTL ran out
(record and files). A checkpoint is readable by its owner, or by anyone once published.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from twinkle.types import InvalidInputError, LoraConfig, NotFoundError
from twinkle.types.api import CheckpointInfo, RunInfo

from ..ops import SaveOp
from ..store import Store
from .common import now, validate_checkpoint_name
from .identity import User

KIND_DIR = {"training": "weights", "sampler": "sampler_weights", "external": "external_weights"}
DIR_KIND = {v: k for k, v in KIND_DIR.items()}

Key = tuple[str, str, str]  # (run_id, kind, name)


def parse_checkpoint_path(path: str, field: str = "checkpoint") -> Key:
    """``tinker://<run>/<weights|sampler_weights>/<name>`` → ``(run_id, kind, name)``."""
    if not isinstance(path, str) or not path.startswith("tinker://"):
        raise InvalidInputError(f"{path!r} is not a tinker:// checkpoint path", field=field)
    parts = path[len("tinker://"):].split("/")
    if len(parts) != 3 or parts[1] not in DIR_KIND or not parts[0]:
        raise InvalidInputError(
            f"{path!r} is not of the form tinker://<run_id>/<weights|sampler_weights>/<name>", field=field
        )
    validate_checkpoint_name(parts[2], field=field)
    return parts[0], DIR_KIND[parts[1]], parts[2]


@dataclass
class Ckpt:
    info: CheckpointInfo
    user: str
    dir: str


class Checkpoints:
    def __init__(self, store: Store, root: Path):
        self.store = store
        self.root = root
        self.by_key: dict[Key, Ckpt] = {}
        self._by_user: dict[str, dict[Key, None]] = {}
        self._expiry: list[tuple[float, Key]] = []  # (expires_at, key)
        self.kick: asyncio.Event | None = None

    def load(self) -> None:
        for row, user, directory in self.store.checkpoints():
            info = CheckpointInfo.model_validate(row)
            self._add((info.run_id, info.kind, info.name), Ckpt(info, user, directory))

    def _add(self, key: Key, ck: Ckpt) -> None:
        self.by_key[key] = ck
        self._by_user.setdefault(ck.user, {})[key] = None
        self._track_expiry(key, ck)

    def _track_expiry(self, key: Key, ck: Ckpt) -> None:
        if ck.info.expires_at is not None:
            heapq.heappush(self._expiry, (ck.info.expires_at, key))
            if self.kick is not None:
                self.kick.set()

    @staticmethod
    def key(run: RunInfo, op: SaveOp) -> Key:
        validate_checkpoint_name(op.name, "name")
        if op.kind not in KIND_DIR:
            raise InvalidInputError(f"kind must be 'training', 'sampler' or 'external', not {op.kind!r}", field="kind")
        if op.ttl_seconds is not None and op.ttl_seconds <= 0:
            raise InvalidInputError("ttl_seconds must be > 0", field="ttl_seconds")
        return (run.run_id, op.kind, op.name)

    def directory(self, run: RunInfo, kind: str, name: str) -> Path:
        d = (self.root / run.user / run.run_id / kind / name).resolve()
        if self.root not in d.parents:
            raise InvalidInputError(f"checkpoint name {name!r} escapes the checkpoint root", field="name")
        return d

    def record(self, run: RunInfo, op: SaveOp, d: Path, size: int | None, step: int) -> CheckpointInfo:
        """Register (and persist) a checkpoint the worker has written into ``d``."""
        t = now()
        kdir = KIND_DIR[op.kind]
        info = CheckpointInfo(
            checkpoint_id=f"{kdir}/{op.name}", run_id=run.run_id, name=op.name, kind=op.kind,
            path=f"tinker://{run.run_id}/{kdir}/{op.name}", created_at=t, step=step,
            size_bytes=size, expires_at=(t + op.ttl_seconds) if op.ttl_seconds else None,
        )
        self._add((run.run_id, op.kind, op.name), Ckpt(info, run.user, str(d)))
        self.store.put_checkpoint(info.model_dump(mode="json"), run.user, str(d))
        return info

    def resolve(self, user: User, ref: str, run: RunInfo | None = None, field: str = "checkpoint") -> Ckpt:
        """A ``tinker://`` path (own or public) or, with ``run``, a bare name of that run's checkpoints."""
        if isinstance(ref, str) and not ref.startswith("tinker://") and run is not None:
            validate_checkpoint_name(ref, field)
            for kind in ("training", "sampler"):
                ck = self.by_key.get((run.run_id, kind, ref))
                if ck is not None:
                    return ck
            raise NotFoundError(f"checkpoint {ref!r} of run {run.run_id!r} not found", field=field)
        key = parse_checkpoint_path(ref, field)
        ck = self.by_key.get(key)
        if ck is None or (ck.user != user.name and not ck.info.public):
            raise NotFoundError(f"checkpoint {ref!r} not found", field=field)
        if not Path(ck.dir).exists():
            raise NotFoundError(f"checkpoint {ref!r} has no files on disk any more", field=field)
        return ck

    @staticmethod
    def model_of(ck: Ckpt, src: RunInfo | None) -> tuple[LoraConfig, str]:
        """The LoRA config and base model a checkpoint was trained with (from its run, or its metadata file)."""
        if src is not None:
            return src.lora.model_copy(), src.base_model
        meta = Path(ck.dir) / "twinkle_checkpoint.json"
        try:
            data = json.loads(meta.read_text())
            return LoraConfig.model_validate(data.get("lora") or {}), str(data["base_model"])
        except Exception:
            raise NotFoundError(f"checkpoint {ck.info.path!r} has no readable metadata", field="checkpoint") from None

    def list(self, user: User, run_id: str | None = None) -> list[CheckpointInfo]:
        out = [
            c.info.model_copy() for c in (self.by_key[k] for k in self._by_user.get(user.name, ()))
            if run_id is None or c.info.run_id == run_id
        ]
        return sorted(out, key=lambda c: c.created_at)

    def readable(self, user: User, path: str) -> CheckpointInfo:
        """Resolve a ``tinker://`` path the user may read (own, or published)."""
        key = parse_checkpoint_path(path, "path")
        ck = self.by_key.get(key)
        if ck is None or (ck.user != user.name and not ck.info.public):
            raise NotFoundError(f"checkpoint {path!r} not found", field="path")
        return ck.info.model_copy()

    def directory_of(self, info: CheckpointInfo) -> Path:
        """Where the files of a listed checkpoint are."""
        ck = self.by_key.get((info.run_id, info.kind, info.name))
        if ck is None:
            raise NotFoundError(f"checkpoint {info.path!r} not found", field="checkpoint_id")
        return Path(ck.dir).resolve()

    def readable_dir(self, user_name: str, path: str) -> Path:
        """The directory of checkpoint ``path`` if ``user_name`` may still read it (a signed download URL)."""
        ck = self.by_key.get(parse_checkpoint_path(path, "token"))
        if ck is None or (ck.user != user_name and not ck.info.public):
            raise NotFoundError("download link not found", field="token")
        return Path(ck.dir).resolve()

    def own(self, user: User, run_id: str, checkpoint_id: str) -> tuple[Key, Ckpt]:
        if not isinstance(checkpoint_id, str) or checkpoint_id.count("/") != 1:
            raise InvalidInputError(
                f"checkpoint id {checkpoint_id!r} must be weights/<name> or sampler_weights/<name>",
                field="checkpoint_id",
            )
        kdir, name = checkpoint_id.split("/")
        kind = DIR_KIND.get(kdir, kdir if kdir in KIND_DIR else None)
        if kind is None:
            raise InvalidInputError(f"unknown checkpoint kind {kdir!r}", field="checkpoint_id")
        validate_checkpoint_name(name, "checkpoint_id")
        key = (run_id, kind, name)
        ck = self.by_key.get(key)
        if ck is None or ck.user != user.name:
            raise NotFoundError(f"checkpoint {checkpoint_id!r} of run {run_id!r} not found", field="checkpoint_id")
        return key, ck

    def drop(self, key: Key) -> Ckpt | None:
        """Forget a checkpoint and delete its files."""
        ck = self.by_key.pop(key, None)
        if ck is None:
            return None
        self._by_user.get(ck.user, {}).pop(key, None)
        self.store.delete_checkpoint(*key)
        d = Path(ck.dir)
        if self.root in d.parents:
            shutil.rmtree(d, ignore_errors=True)
        return ck

    def set_ttl(self, key: Key, ck: Ckpt, ttl_seconds: float | None) -> None:
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise InvalidInputError("ttl_seconds must be > 0 (or null for no expiry)", field="ttl_seconds")
        ck.info.expires_at = (now() + ttl_seconds) if ttl_seconds else None
        self._track_expiry(key, ck)
        self.save(ck)

    def save(self, ck: Ckpt) -> None:
        self.store.put_checkpoint(ck.info.model_dump(mode="json"), ck.user, ck.dir)

    def next_deadline(self) -> float | None:
        return self._expiry[0][0] if self._expiry else None

    def expire(self, t: float) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] < t:
            _, key = heapq.heappop(expiry)
            ck = self.by_key.get(key)
            if ck is not None and ck.info.expires_at is not None and ck.info.expires_at < t:
                self.drop(key)
