"""Red-team findings on numbers outside sampling: a NaN / fractional / out-of-range value in a native
``loss_fn_inputs`` tensor failed inside the model as a *server* error (or was silently truncated), and
``GET /usage?since=nan`` (or ``inf``, ``1e308``) answered 500. Both are now a 400 naming the field."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from twinkle.types import TensorData

sys.path.insert(0, str(Path(__file__).parent))
from _mock_app import mock_app_client  # noqa: E402

API = "/api/v1/twinkle"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    yield from mock_app_client(tmp_path_factory.mktemp("redteam-num"))


BAD_TENSORS = [
    ([9.0, float("nan")], "int64"), ([9, 1.5], "int64"), ([9, 2**70], "int64"),
    ([1.0, float("inf")], "float32"), ([1.0, 1e308], "float32"), ([1.0, float("nan")], "float32"),
]


@pytest.mark.parametrize(("data", "dtype"), BAD_TENSORS, ids=[f"{d[1]!r}-{t}" for d, t in BAD_TENSORS])
def test_tensor_values_must_fit_their_dtype(data, dtype):
    with pytest.raises(ValidationError):
        TensorData(data=data, dtype=dtype)


def test_tensor_good_values_still_pass():
    assert TensorData(data=[9.0, 17], dtype="int64").to_numpy().tolist() == [9, 17]
    assert TensorData(data=[-1e30, 0.5], dtype="float32").to_numpy().shape == (2,)
    assert TensorData(data=[], dtype="float32").to_numpy().size == 0


@pytest.mark.parametrize(("key", "data", "dtype"), [("target_tokens", [9, float("nan")], "int64"),
                                                    ("weights", [1.0, float("inf")], "float32")])
def test_forward_backward_refuses_non_finite_tensor_values(client, key, data, dtype):
    sid = client.post(f"{API}/sessions", json={"lease_seconds": 60}).json()["session_id"]
    ref = client.post(f"{API}/runs", json={"session_id": sid, "base_model": "tiny", "lora": {"rank": 4}}).json()
    run = client.get(f"{API}/futures/{ref['future_id']}", params={"timeout": 30}).json()["result"]["run_id"]
    inputs = {"target_tokens": {"data": [9, 17], "dtype": "int64"}, "weights": {"data": [1.0, 1.0], "dtype": "float32"}}
    inputs[key] = {"data": data, "dtype": dtype}
    datum = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [5, 9]}]}, "loss_fn_inputs": inputs}
    r = client.post(f"{API}/runs/{run}/forward_backward", content=json.dumps({"data": [datum]}, allow_nan=True),
                    headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["detail"]["field"].startswith("data[0].loss_fn_inputs"), r.json()


@pytest.mark.parametrize("since", ["nan", "inf", "-inf", "1e308", "-5", "99999999999999999999d"])
@pytest.mark.parametrize("route", ["/usage", "/admin/usage"])
def test_usage_times_out_of_range_are_400(client, route, since):
    r = client.get(f"{API}{route}", params={"since": since})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if r.status_code == 400:
        assert r.json()["detail"]["field"] == "since", r.json()


def test_usage_good_times_still_work(client):
    assert client.get(f"{API}/usage", params={"since": "24h"}).status_code == 200
    assert client.get(f"{API}/usage", params={"since": "2026-01-31", "until": "1h"}).status_code == 200
