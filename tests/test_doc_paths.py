"""Every repository file that the code's docstrings and comments, the package docs and ``docs/*.md`` name exists.

A path counts when it starts at the repository root (``docs/``, ``twinkle/``, ``cookbook/``, ...) and names a
file (it has a suffix): URL paths such as ``twinkle/api/`` (the Jupyter server's routes) are not files.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_TOP = r"(?:docs|twinkle|twinkle_client|cookbook|tests|scripts|bench|notebooks|extension|\.ci)"
_PATH = re.compile(r"(?<![\w./-])(" + _TOP + r"/[\w./-]*\.[A-Za-z]\w*)(?![\w/-])")


def _texts() -> Iterator[tuple[Path, str]]:
    for package in ("twinkle", "twinkle_client"):
        for f in sorted((ROOT / package).rglob("*.py")):
            source = f.read_text()
            for node in ast.walk(ast.parse(source, str(f))):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node, clean=False)
                    if doc:
                        yield f, doc
            yield f, "\n".join(line[line.index("#"):] for line in source.splitlines() if "#" in line)
        for f in sorted((ROOT / package).rglob("*.md")):
            yield f, f.read_text()
    for f in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]:
        yield f, f.read_text()


def test_every_named_file_exists():
    missing = sorted({f"{f.relative_to(ROOT)}: {m.group(1)}" for f, text in _texts() for m in _PATH.finditer(text)
                      if not (ROOT / m.group(1)).exists()})
    assert not missing, "files named in docstrings/docs that do not exist:\n" + "\n".join(missing)


def test_the_check_sees_a_missing_file():
    assert _PATH.findall("see ``docs/no-such-doc.md`` §2, twinkle/api/ and docs/server.md.") == [
        "docs/no-such-doc.md", "docs/server.md"]
