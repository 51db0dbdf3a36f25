"""The Jupyter server's ``twinkle/`` routes, in a real Jupyter server, against the real Twinkle gateway (mock
backend, in process: ``live_twinkle.py``)."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from jupyter_proc import JupyterServer, free_port
from live_twinkle import MODEL, LiveTwinkle

from twinkle_client.jupyter_server import connection_file


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("twinkle-home")
    work = tmp_path_factory.mktemp("work")
    return {"home": home, "work": work}


@pytest.fixture(scope="module")
def jupyter(env):
    # only the Twinkle extension: the others installed beside it (lab, LSP, terminals, ...) cost ~1 s of start-up
    off = [f"--ServerApp.jpserver_extensions={name}=False"
           for name in ("jupyterlab", "jupyter_lsp", "jupyter_server_terminals", "notebook_shim", "notebook")]
    server = JupyterServer(env["work"], {"TWINKLE_HOME": str(env["home"]), "JUPYTER_CONFIG_DIR": str(env["work"] / "cfg")},
                           extra_args=off)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def twinkle(tmp_path_factory):
    with LiveTwinkle(workdir=tmp_path_factory.mktemp("twinkle-server")) as f:
        yield f


@pytest.fixture
def kernel_conn(env, monkeypatch):
    """Simulates a kernel that ran `%twinkle connect`: a connection record written by this (live) process."""
    monkeypatch.setenv("TWINKLE_HOME", str(env["home"]))
    written: list[int] = []

    def write(url: str, key: str, session: str = "sess-1") -> None:
        connection_file.record_connection(url, key, session)
        written.append(os.getpid())

    yield write
    connection_file.forget_connection()


def test_routes_need_jupyter_auth(jupyter):
    r = httpx.get(f"{jupyter.url}/twinkle/overview")
    assert r.status_code == 403


def test_not_configured(jupyter):
    body = jupyter.client.get("/twinkle/overview").json()
    assert body["state"] == "not_configured"
    assert "%twinkle connect" in body["message"]
    assert jupyter.client.get("/twinkle/api/runs").status_code == 409


def test_kernel_connection_is_shown_without_the_key(jupyter, twinkle, kernel_conn):
    kernel_conn(twinkle.url + "/api/v1", twinkle.api_key, twinkle.session_id)
    r = jupyter.client.get("/twinkle/overview")
    body = r.json()
    assert body["state"] == "connected", body
    assert body["connection"]["source"] == "kernel"
    assert body["connection"]["url"] == twinkle.url
    assert body["connection"]["session_id"] == twinkle.session_id
    assert twinkle.api_key not in r.text
    assert [x["run_id"] for x in body["runs"]] == [twinkle.run_id]
    assert body["runs"][0]["step"] == 3
    assert body["capabilities"]["base_models"][0]["name"] == MODEL
    assert body["capabilities"]["base_models"][0]["max_adapters"] == 4

    run = twinkle.run_id
    hist = jupyter.client.get(f"/twinkle/api/runs/{run}/metrics").json()
    assert hist == twinkle.get(f"runs/{run}/metrics")
    assert [p["kind"] for p in hist["points"]].count("optim_step") == 3
    names = [c["name"] for c in jupyter.client.get(f"/twinkle/api/runs/{run}/checkpoints").json()["checkpoints"]]
    assert sorted(names) == ["step-1", "step-2"]

    # delete a checkpoint through the proxy; nothing else may be written
    r = jupyter.client.delete(f"/twinkle/api/runs/{run}/checkpoints/training/step-1")
    assert r.status_code == 200 and r.json()["name"] == "step-1"
    assert twinkle.checkpoint_names() == ["step-2"]
    assert jupyter.client.delete(f"/twinkle/api/sessions/{twinkle.session_id}").status_code == 403  # runs/{id} is deletable (panel ✕)
    assert jupyter.client.get("/twinkle/api/futures/abc").status_code == 403
    assert jupyter.client.get("/twinkle/api/runs/missing/metrics").status_code == 404


def test_bad_key_and_server_down_are_reported(jupyter, twinkle, kernel_conn):
    kernel_conn(twinkle.url, "not-the-right-key")
    body = jupyter.client.get("/twinkle/overview").json()
    assert body["state"] == "bad_key"
    assert "rejected the API key" in body["message"] and "401" in body["message"]
    r = jupyter.client.get(f"/twinkle/api/runs/{twinkle.run_id}/metrics")
    assert r.status_code == 401 and r.json()["state"] == "bad_key"

    dead = f"http://127.0.0.1:{free_port()}"
    kernel_conn(dead, twinkle.api_key)
    body = jupyter.client.get("/twinkle/overview").json()
    assert body["state"] == "server_down"
    assert f"Cannot reach the Twinkle server at {dead}" in body["message"]
    assert jupyter.client.get("/twinkle/api/runs").status_code == 502


def test_panel_connection(jupyter, twinkle):
    r = jupyter.client.post("/twinkle/connection", content=json.dumps({"url": twinkle.url, "api_key": "wrong"}))
    assert r.status_code == 200 and r.json()["state"] == "bad_key"
    r = jupyter.client.post("/twinkle/connection", content=json.dumps({"url": twinkle.url, "api_key": twinkle.api_key}))
    body = r.json()
    assert body["state"] == "connected" and body["connection"]["source"] == "panel"
    assert twinkle.api_key not in r.text
    ov = jupyter.client.get("/twinkle/overview").json()
    assert ov["state"] == "connected" and ov["connection"]["source"] == "panel"
    # bad input names the field
    r = jupyter.client.post("/twinkle/connection", content=json.dumps({"api_key": "x"}))
    assert r.status_code == 400 and r.json()["field"] == "url"
    r = jupyter.client.post("/twinkle/connection", content=b"not json")
    assert r.status_code == 400
    r = jupyter.client.post("/twinkle/connection", content=json.dumps({"url": "ftp://x", "api_key": "k"}))
    assert r.status_code == 400 and r.json()["field"] == "url"
    # the server keeps serving; forgetting the panel connection returns to not configured
    r = jupyter.client.delete("/twinkle/connection")
    assert r.json()["configured"] is False
    assert jupyter.client.get("/twinkle/overview").json()["state"] == "not_configured"
