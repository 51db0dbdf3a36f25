"""An in-process Twinkle server built from a SHIPPED config file (default: the transformer one), for runs of
unmodified tinker-cookbook recipes. Only what must differ on a test machine is overridden: persistence goes to
a temp dir, the bootstrap key is set, and the server listens on a free loopback port. Every model, limit and
scheduler knob is the file's own.

``with shipped_server() as srv:`` yields ``srv.url``, ``srv.api_key``, ``srv.base_model``, ``srv.workdir``,
``srv.app`` (the FastAPI app, to read the service or worker state) and ``srv.config``.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
TRANSFORMER_CONFIG = ROOT / "cookbook" / "client" / "server" / "transformer" / "server_config.yaml"
KEY = "tml-cookbook-recipes"


@dataclass
class ShippedServer:
    url: str
    api_key: str
    base_model: str
    workdir: Path
    app: Any
    config: Any


@contextmanager
def shipped_server(config_path: Path = TRANSFORMER_CONFIG) -> Iterator[ShippedServer]:
    import uvicorn

    from twinkle.local_server import free_port
    from twinkle.server.app import create_app, worker_config
    from twinkle.server.config import parse_config
    from twinkle.server.worker import ModelWorker

    raw = yaml.safe_load(config_path.read_text())
    with tempfile.TemporaryDirectory(prefix="twinkle-shipped-") as d:
        raw["persistence"] = {**raw.get("persistence", {}), "sqlite_path": f"{d}/server.db",
                              "checkpoint_root": f"{d}/checkpoints"}
        raw["auth"] = {"bootstrap_key_env": None}
        cfg = parse_config(raw)
        workers = {m.served_name: [ModelWorker(worker_config(m), i) for i in range(m.replicas)] for m in cfg.models}
        app = create_app(cfg, workers)
        app.state.service.add_bootstrap_key(KEY, "cookbook")
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True, name="twinkle-shipped")
        thread.start()
        deadline = time.time() + 300
        while not server.started:
            if time.time() > deadline or not thread.is_alive():
                raise RuntimeError("the in-process Twinkle server did not start")
            time.sleep(0.05)
        try:
            yield ShippedServer(f"http://127.0.0.1:{port}", KEY, cfg.models[0].served_name, Path(d), app, cfg)
        finally:
            server.should_exit = True
            thread.join(timeout=30)
