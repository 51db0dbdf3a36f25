"""Shared test settings: small thread counts (2-core CI), an isolated TWINKLE_HOME cache."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):  # type: ignore[no-untyped-def]
    """No test may leave the server's lean ``PYTHONPATH`` (``_lean_site``: pandas shadowed) in this process's
    environment: every later subprocess would inherit it (nbval's notebook kernels lost pandas that way)."""
    result = yield  # the test's fixtures are torn down first
    path = os.environ.get("PYTHONPATH", "")
    if "_lean_site" in path:
        raise AssertionError(f"{item.nodeid} left the server's lean PYTHONPATH in os.environ: {path}")
    return result
