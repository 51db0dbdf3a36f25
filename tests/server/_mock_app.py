"""The gateway app on in-process workers: ``mock_app_client`` (one mock worker, ``mock://tiny`` served as
``tiny``, with alice's key) and ``inprocess_app`` (any models, a key per user)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient

from twinkle.server.app import create_app, worker_config
from twinkle.server.config import parse_config
from twinkle.server.store import Store
from twinkle.server.worker import ModelWorker


def mock_app_client(tmp: Path) -> Iterator[TestClient]:
    """Yield a ``TestClient`` that sends alice's key; server errors come back as responses, not exceptions."""
    cfg = parse_config({
        "persistence": {"sqlite_path": str(tmp / "db.sqlite"), "checkpoint_root": str(tmp / "ck")},
        "models": [{"name": "tiny", "backend": "mock", "model_id": "mock://tiny"}],
    })
    store = Store(cfg.persistence.sqlite_file())
    key = store.create_key("alice")[1]
    app = create_app(cfg, {"tiny": [ModelWorker(worker_config(cfg.models[0]))]}, store=store)
    with TestClient(app, raise_server_exceptions=False, headers={"X-API-Key": key}) as c:
        yield c


def inprocess_app(tmp: Path, models: list[dict], users: tuple[str, ...] = ("alice",)
                  ) -> tuple[FastAPI, dict[str, str], dict[str, ModelWorker]]:
    """The gateway app on one in-process worker per model of ``models`` (config entries), an API key per user
    and the workers by served name."""
    cfg = parse_config({
        "persistence": {"sqlite_path": str(tmp / "db.sqlite"), "checkpoint_root": str(tmp / "ck")},
        "models": models,
    })
    store = Store(cfg.persistence.sqlite_file())
    keys = {u: store.create_key(u)[1] for u in users}
    workers = {m.served_name: ModelWorker(worker_config(m)) for m in cfg.models}
    return create_app(cfg, {name: [w] for name, w in workers.items()}, store=store), keys, workers
