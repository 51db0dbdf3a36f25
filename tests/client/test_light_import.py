"""``import twinkle_client`` works where torch (and ray, fastapi) cannot be imported; the code base's layering: no
import cycles, no private names imported across packages."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def test_import_without_torch_ray_fastapi():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'ray', 'fastapi', 'transformers', 'peft'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        import twinkle_client, twinkle_client.model, twinkle_client.sampler, twinkle_client.session
        import twinkle_client.magics, twinkle_client.widgets
        bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'fastapi', 'ipywidgets', 'pandas'))
        print('BAD', bad)
        assert not bad, bad
        print('OK')
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


# ---- layering of the whole code base (static: the import graph as written, without importing anything) --------

_ROOT = Path(__file__).resolve().parents[2]
_PACKAGES = ("twinkle", "twinkle_client")


def test_no_import_cycles():
    """No module reaches itself through imports, counting every import (``if TYPE_CHECKING:`` and function-level
    ones too): a protocol or a passed-in factory breaks a cycle, not a deferred import."""
    grimp = pytest.importorskip("grimp")  # the dev extra installs it
    graph = grimp.build_graph(*_PACKAGES, cache_dir=None)
    assert "twinkle.server.service" in graph.find_modules_directly_imported_by("twinkle.server.app")  # sees edges
    cycles = set()
    for importer in sorted(m for m in graph.modules if m.split(".")[0] in _PACKAGES):
        for imported in graph.find_modules_directly_imported_by(importer):
            if imported.split(".")[0] not in _PACKAGES:
                continue
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                cycles.add(" -> ".join((importer, *back)))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles))


def _area(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "twinkle" else parts[0]


def test_no_private_imports_across_packages():
    """A module imports only public names from outside its own area (``twinkle.<area>`` or ``twinkle_client``):
    no ``_private`` module and no ``_private`` name."""
    bad = []
    for root in _PACKAGES:
        for path in sorted((_ROOT / root).rglob("*.py")):
            rel = path.relative_to(_ROOT).with_suffix("")
            module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            package = module if rel.name == "__init__" else module.rpartition(".")[0]
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.ImportFrom):
                    continue
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                if target.split(".")[0] not in _PACKAGES or _area(target) == _area(module):
                    continue
                private = [p for p in target.split(".") if p.startswith("_") and not p.startswith("__")]
                private += [a.name for a in node.names if a.name.startswith("_")]
                if private:
                    bad.append(f"{path.relative_to(_ROOT)}:{node.lineno}: from {target} import {private}")
    assert not bad, "private names imported across packages:\n" + "\n".join(bad)


def test_the_server_does_not_import_the_demo_server():
    """``twinkle.local_server`` (a demo/test helper that runs ``twinkle-server``) sits above the server."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph(*_PACKAGES, cache_dir=None)
    assert not graph.chain_exists(importer="twinkle.server", imported="twinkle.local_server", as_packages=True)
