"""Test tiers for the whole repository.

``pytest -m "not slow" -n 2`` is the fast tier (unit tests of every module, under a minute on 2 cores); plain ``pytest``
runs everything. A test is slow when it starts a real server (``integration``), drives a browser
(``browser``), runs a tutorial notebook (nbval), or carries ``@pytest.mark.slow`` itself.
"""

from __future__ import annotations

from typing import Any

import pytest

_SLOW_MARKERS = ("integration", "browser")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[Any]) -> None:
    # tryfirst: the marks must be on the items before `-m` deselects and before notebooks/conftest.py decides
    # whether a tutorial server is needed.
    for item in items:
        if type(item).__name__ == "IPyNbCell" or any(item.get_closest_marker(m) for m in _SLOW_MARKERS):
            item.add_marker(pytest.mark.slow)
