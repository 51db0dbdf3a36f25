"""The fault suite (slow tier): a real ``twinkle-server launch`` of this module's own, then

1. ``kill -9`` of the worker replica (its pid found through the launch's marks: only this test's server);
   Ray Serve brings a fresh, empty replica back: a run saved at its current step carries on transparently, a
   run with unsaved steps is reloaded from its checkpoint and says so once (naming it), a run without a
   checkpoint is ``lost`` with a reason;
2. ``kill -9`` of the launcher: Ray's processes and Serve's HAProxy outlive it (HAProxy keeps the port);
   a new launch on the same config stops them and comes up on the same port; no process of the dead launch
   is left; every run that was loaded is serving again from its checkpoint or names it;
3. throughout: a retried call (same seq_id) is applied and counted once.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import httpx
import pytest

from twinkle.server import orphans
from twinkle.types import datum_from_tokens

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.isdir("/proc"), reason="Linux /proc needed")]

DATA = [datum_from_tokens([5, 9, 17, 33, 2, 8]).model_dump(mode="json")]


class Native:
    def __init__(self, url: str, key: str):
        self.c = httpx.Client(base_url=f"{url}/api/v1/twinkle", headers={"X-API-Key": key}, timeout=120)

    def req(self, method: str, path: str, **kw: Any) -> Any:
        r = self.c.request(method, path, **kw)
        assert r.status_code < 500, r.text
        return r

    def wait(self, ref: dict, limit: float = 180) -> dict:
        deadline = time.monotonic() + limit
        while True:
            st = self.req("GET", f"/futures/{ref['future_id']}", params={"timeout": 20}).json()
            if st["status"] != "pending" or time.monotonic() > deadline:
                return st

    def ok(self, method: str, path: str, **kw: Any) -> Any:
        r = self.req(method, path, **kw)
        assert r.status_code == 200, r.text
        st = self.wait(r.json())
        assert st["status"] == "complete", st
        return st["result"]


class Run:
    def __init__(self, api: Native, session_id: str):
        self.api = api
        self.id = api.ok("POST", "/runs", json={"session_id": session_id, "base_model": "mock",
                                                "lora": {"rank": 4, "seed": 1}})["run_id"]
        self.seq = 0

    def send(self, op: str, body: dict, seq: int | None = None) -> httpx.Response:
        if seq is None:
            self.seq += 1
            seq = self.seq
        return self.api.req("POST", f"/runs/{self.id}/{op}", json={**body, "seq_id": seq})

    def call(self, op: str, body: dict) -> dict:
        r = self.send(op, body)
        assert r.status_code == 200, r.text
        return self.api.wait(r.json())

    def error(self, op: str, body: dict) -> dict:
        """The error of a call that must fail: refused at once (4xx) or as a failed future."""
        r = self.send(op, body)
        if r.status_code != 200:
            return r.json()
        st = self.api.wait(r.json())
        assert st["status"] == "failed", st
        return st["error"]

    def step(self) -> None:
        assert self.call("forward_backward", {"data": DATA})["status"] == "complete"
        # the reply of the optimizer step is "lost" and the client sends it twice more (same seq_id)
        first = self.call("optim_step", {"adam_params": {"learning_rate": 0.05}})
        for _ in range(2):
            again = self.send("optim_step", {"adam_params": {"learning_rate": 0.05}}, seq=self.seq)
            assert self.api.wait(again.json())["result"] == first["result"]

    def loss(self) -> float:
        st = self.call("forward", {"data": DATA})
        assert st["status"] == "complete", st
        return st["result"]["metrics"]["loss:sum"]

    def info(self) -> dict:
        return self.api.req("GET", f"/runs/{self.id}").json()

    def save(self, name: str) -> dict:
        st = self.call("checkpoints", {"name": name})
        assert st["status"] == "complete", st
        return st["result"]


def _launch_pids(launcher_pid: int) -> list[int]:
    """Every process this test's launch started (they carry its launcher pid in their environment)."""
    out = []
    for pid in orphans._pids():
        env = _full_env(pid)
        if env.get(orphans.LAUNCHER_PID) == str(launcher_pid):
            out.append(pid)
    return out


def _still_alive(old: dict[int, str | None], within_s: float = 15.0) -> list[int]:
    """The processes of ``old`` (pid -> start time) still running (not zombies, not a reused pid) after up to
    ``within_s``: one that is still on its way out a moment after the relaunch is not a leftover."""
    deadline = time.monotonic() + within_s
    while True:
        alive = [p for p, start in old.items() if orphans._start_time(p) == start and not orphans._zombie(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def _describe(pids: list[int]) -> str:
    """What each process is, for a failure message: pid, state, command line, launch markers."""
    out = []
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[-1].split()[0].decode()
        except OSError:
            state = "?"
        out.append(f"{p} [{state}] {orphans._cmdline(p)[:120]!r} {orphans._environ(p)}")
    return "; ".join(out) or "none"


def _full_env(pid: int) -> dict[str, str]:
    return orphans._environ(pid)


def _replica_pid(launcher_pid: int, deployment: str) -> int:
    found = [p for p in _launch_pids(launcher_pid) if f"ServeReplica:twinkle:{deployment}" in orphans._cmdline(p)]
    assert len(found) == 1, found
    return found[0]


def test_kill_worker_replica_then_launcher(tmp_path):
    from tests.integration.conftest import make_server_config, own_server

    cfg = make_server_config(tmp_path, 0)
    # its own worker deployment (the only model would otherwise run inside the gateway replica)
    cfg["models"] = [{**m, "placement": "replica"} for m in cfg["models"] if m["backend"] == "mock"]
    with own_server(cfg, "twinkle-faults-") as server:
        api = Native(server.url, server.keys["alice"])
        sid = api.req("POST", "/sessions", json={"lease_seconds": 900}).json()["session_id"]
        clean, dirty, bare = Run(api, sid), Run(api, sid), Run(api, sid)
        for r in (clean, dirty, bare):
            r.step()
        clean.step()
        clean_ck = clean.save("c2")
        clean_loss = clean.loss()
        dirty_ck = dirty.save("d1")
        dirty_loss = dirty.loss()
        dirty.step()
        dirty.step()  # steps 2 and 3: only in the replica's memory
        assert [r.info()["step"] for r in (clean, dirty, bare)] == [2, 3, 1]
        assert clean_ck["step"] == 2 and dirty_ck["step"] == 1

        # ---- 1. kill -9 of the worker replica -----------------------------------------------------------------
        launcher = server.proc.pid
        victim = _replica_pid(launcher, "worker-mock-0")
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        assert clean.loss() == pytest.approx(clean_loss)  # waits for the new replica, then transparent
        back_s = time.monotonic() - t0
        assert clean.info()["state"] == "active" and clean.info()["step"] == 2
        err = dirty.error("forward_backward", {"data": DATA})
        assert err["code"] == "state_lost" and dirty_ck["path"] in err["error"], err
        assert "step 1" in err["error"] and "step 3" in err["error"]
        assert dirty.info()["step"] == 1 and dirty.loss() == pytest.approx(dirty_loss)
        dirty.step()
        assert dirty.info()["step"] == 2
        err = bare.error("forward_backward", {"data": DATA})
        assert err["code"] == "state_lost" and "no checkpoint" in err["error"], err
        assert bare.info()["state"] == "lost"
        print(f"replica restart: calls served again after {back_s:.1f} s")

        # ---- 2. kill -9 of the launcher -------------------------------------------------------------------------
        dirty_ck2 = dirty.save("d2")
        old = {p: orphans._start_time(p) for p in _launch_pids(launcher)}  # pid -> start time (pids get reused)
        assert old
        os.kill(launcher, signal.SIGKILL)
        server.proc.wait(timeout=30)
        time.sleep(2)
        left = [p for p in old if orphans._start_time(p) == old[p] and not orphans._zombie(p)]
        print(f"after SIGKILL of the launcher: {len(left)} of its processes still alive ({_describe(left)}), "
              f"port held by {orphans.port_holders(server.port)}")
        t1 = time.monotonic()
        ready_lines = server.log_path.read_text().count("Twinkle server ready")
        server.start()  # same config, same port: must reap the leftovers first
        while server.log_path.read_text().count("Twinkle server ready") == ready_lines:  # not the old gateway
            assert server.proc.poll() is None, server.log_path.read_text()[-3000:]
            assert time.monotonic() - t1 < 300
            time.sleep(0.5)
        print(f"relaunch ready after {time.monotonic() - t1:.1f} s")
        reaped = "leftover processes of a killed twinkle launcher" in server.log_path.read_text()
        print(f"the relaunch {'stopped' if reaped else 'found no'} leftovers of the killed launch")
        assert not _still_alive(old), _describe(_still_alive(old))
        assert set(orphans.port_holders(server.port)) <= set(_launch_pids(server.proc.pid))
        api2 = Native(server.url, server.keys["alice"])
        for r in (clean, dirty, bare):
            r.api = api2
        assert clean.loss() == pytest.approx(clean_loss) and clean.info()["step"] == 2
        assert dirty.info()["state"] == "active" and dirty.info()["step"] == dirty_ck2["step"] == 2
        dirty.step()
        assert dirty.info()["step"] == 3
        lost = bare.info()
        assert lost["state"] == "lost" and lost["metadata"]["lost_reason"]
        hist = api2.req("GET", f"/runs/{dirty.id}/metrics").json()["points"]
        assert [p["step"] for p in hist if p["kind"] == "optim_step"] == [3]  # counted once since the restart
