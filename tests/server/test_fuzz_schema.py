"""Schema-driven fuzzing (schemathesis) of the whole gateway app in process, mock backend: every operation
of ``/openapi.json`` gets generated requests, valid and invalid; no answer may be a 5xx, and the server
answers normally afterwards. The fast tier sends two per operation; the slow tier sends ≥ 5000 in all (~2 min here under load).

Cases come from schemathesis' per-operation hypothesis strategies, sent through one TestClient (no
schemathesis runner: its extra phases cost several times more per request)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from twinkle.server.app import create_app, worker_config  # noqa: E402
from twinkle.server.config import parse_config  # noqa: E402
from twinkle.server.store import Store  # noqa: E402
from twinkle.server.worker import ModelWorker  # noqa: E402

_TMP = Path(tempfile.mkdtemp(prefix="twinkle-fuzz-"))
_CFG = parse_config({
    "persistence": {"sqlite_path": str(_TMP / "db.sqlite"), "checkpoint_root": str(_TMP / "ck")},
    "limits": {"max_request_bytes": 1 << 20},
    "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny"}],
})
_STORE = Store(_CFG.persistence.sqlite_file())
KEY = _STORE.create_key("fuzzer")[1]
APP = create_app(_CFG, {"mock": [ModelWorker(worker_config(_CFG.models[0]))]}, store=_STORE)
HEADERS = {"X-API-Key": KEY}

schema = schemathesis.openapi.from_asgi("/openapi.json", APP, headers=HEADERS)
# Long-polls would only slow the run down (they answer 200 or 4xx after holding): bound them.
_SKIP_PARAMS = {"wait": 0, "timeout": 0}
COUNTS = {"requests": 0, "5xx": []}
_KWARGS = {"method", "url", "headers", "params", "json", "content", "data", "files"}
_CLIENT: list = []


def _client():
    """One TestClient kept open for the module: one event loop thread for every request (a TestClient per
    request costs a new thread and loop each time)."""
    if not _CLIENT:
        from fastapi.testclient import TestClient

        c = TestClient(APP, raise_server_exceptions=False)
        c.__enter__()
        _CLIENT.append(c)
    return _CLIENT[0]


def _fuzz(case) -> None:
    if case.query:
        for k in _SKIP_PARAMS:
            if k in case.query:
                case.query[k] = _SKIP_PARAMS[k]
    kwargs = case.as_transport_kwargs(base_url="http://testserver", headers=HEADERS)
    kwargs = {k: v for k, v in kwargs.items() if k in _KWARGS and v is not None}
    if isinstance(kwargs.get("data"), (bytes, str)):
        kwargs["content"] = kwargs.pop("data")
    response = _client().request(**kwargs)
    COUNTS["requests"] += 1
    if response.status_code >= 500:
        COUNTS["5xx"].append((case.method, case.formatted_path, response.status_code, response.text[:300]))
    assert response.status_code < 500, (case.method, case.formatted_path, response.text[:500])


def _fuzz_all(per_operation: int) -> int:
    """Generated requests (valid and invalid) for every operation of the schema; returns how many were sent."""
    sent_before = COUNTS["requests"]
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=per_operation, deadline=None, derandomize=True, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(operation.as_strategy())
        def fuzz_operation(case) -> None:
            _fuzz(case)

        fuzz_operation()
    return COUNTS["requests"] - sent_before


def test_fuzz_no_5xx_fast():
    assert _fuzz_all(2) >= 60


@pytest.mark.slow
def test_fuzz_no_5xx_thorough():
    assert _fuzz_all(90) >= 5000


def test_server_healthy_after_fuzzing():
    client = _client()
    assert client.get("/api/v1/healthz").json() == {"status": "ok"}
    assert client.get("/api/v1/twinkle/capabilities", headers=HEADERS).status_code == 200
    assert not COUNTS["5xx"], COUNTS["5xx"][:5]
