"""No private cross-package imports: a module may import ``_names`` only from its own package (the same
top-level subpackage of ``twinkle``, or ``twinkle_client`` from itself)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "twinkle" else parts[0]


def _violations() -> list[str]:
    out = []
    for top in ("twinkle", "twinkle_client"):
        for path in (ROOT / top).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            module = ".".join(rel.parts)
            pkg_parts = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")[:-1]
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.ImportFrom):
                    continue
                if node.level:
                    base = pkg_parts[: len(pkg_parts) - node.level + 1]
                    target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                else:
                    target = node.module or ""
                if not target.startswith(("twinkle.", "twinkle_client")) or _package(target) == _package(module):
                    continue
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        out.append(f"{module}: from {target} import {alias.name}")
    return out


KNOWN = {
    # left as they were found (other areas' code); do not add to this list: make the name public instead
    "twinkle.model.hub: from twinkle.data.chat import _chatml",
    "twinkle.model.builtin._corpus: from twinkle.data.chat import _chatml",
    "twinkle.model.transformers.backend: from twinkle.sampler import _kv",
}


def test_no_private_names_imported_across_packages():
    assert sorted(set(_violations()) - KNOWN) == []
