"""Load a cookbook script as a module and run its ``main`` in this process (no subprocess, no second torch
import), against the shared ``twinkle_server``."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
COOKBOOK = ROOT / "cookbook" / "client"


def load_script(kind: str, name: str) -> ModuleType:
    path = COOKBOOK / kind / "self_host" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"cookbook_{kind}_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_script(kind: str, name: str, server: Any, **overrides: Any) -> dict:
    """``main(Config(...))`` of ``cookbook/client/<kind>/self_host/<name>.py`` on the test server's tiny model."""
    module = load_script(kind, name)
    cfg = dataclasses.replace(module.Config(), base_url=server.url, api_key=server.api_key,
                              base_model=server.base_model, **overrides)
    return module.main(cfg)
