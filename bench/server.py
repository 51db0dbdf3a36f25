"""Server overhead, measured side by side in one run.

1. Round-trip latency (p50/p99) of a trivial call: ``GET runs/{id}`` over HTTP through the Ray Serve server vs
   ``Service.get_run`` in process; and a 1-token mock ``forward`` (submit + long-poll) through the server vs
   ``ModelWorker.execute`` in process.
2. Training throughput (tokens/s of forward_backward + optim_step) on ``builtin://tiny`` (transformers):
   through the server vs the same backend used locally. Target: ratio >= 0.9.

    .venv/bin/python bench/server.py [--steps 12] [--batch 8] [--seq 64] [--calls 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")
API = "/api/v1/twinkle"


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _datum(tokens: list[int]) -> dict:
    return {"model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens[:-1]}]},
            "loss_fn_inputs": {"target_tokens": {"data": tokens[1:], "dtype": "int64"},
                               "weights": {"data": [1.0] * (len(tokens) - 1), "dtype": "float32"}}}


def _batch(n: int, seq: int, vocab: int = 200) -> list[dict]:
    return [_datum([(7 * i + 3 * j) % vocab + 1 for j in range(seq + 1)]) for i in range(n)]


def _start_server(workdir: Path) -> tuple[subprocess.Popen, str, str, Path]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = {
        "http": {"host": "127.0.0.1", "port": port}, "auth": {"bootstrap_key_env": None},
        "persistence": {"sqlite_path": str(workdir / "db.sqlite"), "checkpoint_root": str(workdir / "ck")},
        "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny", "ray_actor_options": {"num_cpus": 0}},
                   {"backend": "transformers", "model_id": "builtin://tiny", "ray_actor_options": {"num_cpus": 0}}],
    }
    path = workdir / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = [sys.executable, "-m", "twinkle.server.cli"]
    key = subprocess.run([*cli, "keys", "create", "--user", "bench", "-c", str(path)], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    log = open(workdir / "server.log", "w")  # noqa: SIM115
    t0 = time.monotonic()
    proc = subprocess.Popen([*cli, "launch", "-c", str(path)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited; see {workdir / 'server.log'}")
        try:
            if httpx.get(f"{url}/api/v1/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    print(f"server cold start (launch -> healthy): {time.monotonic() - t0:.1f} s")
    return proc, url, key, workdir / "server.log"


def _wait(c: httpx.Client, ref: dict) -> dict:
    while True:
        body = c.get(f"{API}/futures/{ref['future_id']}", params={"timeout": 30}).json()
        if body["status"] == "complete":
            return body["result"]
        if body["status"] == "failed":
            raise RuntimeError(body["error"])


def _server_side(url: str, key: str, args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {}
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=120) as c:
        t0 = time.monotonic()
        sid = c.post(f"{API}/sessions", json={}).json()["session_id"]
        mock_run = _wait(c, c.post(f"{API}/runs", json={"session_id": sid, "base_model": "mock",
                                                         "lora": {"rank": 4}}).json())["run_id"]
        first = _wait(c, c.post(f"{API}/runs/{mock_run}/forward", json={"data": [_datum([1, 2])]}).json())
        out["first_result_s"] = time.monotonic() - t0
        assert first["loss_fn_outputs"]
        lat = []
        for _ in range(args.calls):
            t = time.perf_counter()
            c.get(f"{API}/runs/{mock_run}").raise_for_status()
            lat.append(time.perf_counter() - t)
        out["get_run"] = lat
        lat = []
        for _ in range(args.calls // 2):
            t = time.perf_counter()
            _wait(c, c.post(f"{API}/runs/{mock_run}/forward", json={"data": [_datum([1, 2])]}).json())
            lat.append(time.perf_counter() - t)
        out["forward"] = lat
        run = _wait(c, c.post(f"{API}/runs", json={"session_id": sid, "base_model": "builtin://tiny",
                                                    "lora": {"rank": 8, "seed": 0}}).json())["run_id"]
        batch = _batch(args.batch, args.seq)
        tokens = args.batch * args.seq
        for i in range(args.steps + 2):
            if i == 2:
                t = time.perf_counter()
            # as the clients do (twinkle_client's blocking loop, the Tinker SDK): the optimizer step is sent
            # right behind its forward_backward, then both are awaited (the worker runs them in seq order)
            fb = c.post(f"{API}/runs/{run}/forward_backward", json={"seq_id": 2 * i + 1, "data": batch}).json()
            opt = c.post(f"{API}/runs/{run}/optim_step",
                         json={"seq_id": 2 * i + 2, "adam_params": {"learning_rate": 1e-3}}).json()
            _wait(c, fb)
            _wait(c, opt)
        out["train_tok_s"] = tokens * args.steps / (time.perf_counter() - t)
        # an asynchronous client (twinkle_client's *_async calls, the Tinker SDK's futures) keeps the next step
        # queued while the current one runs: 2 steps in flight, results still awaited in order
        seq, pending = 2 * (args.steps + 2), []
        for i in range(args.steps + 2):
            if i == 2:
                t = time.perf_counter()
            seq += 2
            pending.append((c.post(f"{API}/runs/{run}/forward_backward", json={"seq_id": seq - 1, "data": batch}).json(),
                            c.post(f"{API}/runs/{run}/optim_step",
                                   json={"seq_id": seq, "adam_params": {"learning_rate": 1e-3}}).json()))
            if len(pending) == 2:
                for ref in pending.pop(0):
                    _wait(c, ref)
        for ref in pending.pop(0):
            _wait(c, ref)
        out["train_tok_s_pipelined"] = tokens * args.steps / (time.perf_counter() - t)
    return out


def _local_side(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    from twinkle.model.base import BatchItem
    from twinkle.server.app import worker_config
    from twinkle.server.backends import build_backend
    from twinkle.server.config import parse_config
    from twinkle.server.ops import ForwardBackwardOp
    from twinkle.server.service import Service, User
    from twinkle.server.worker import ModelWorker
    from twinkle.types import AdamParams, Datum, LoraConfig

    out: dict[str, object] = {}
    cfg = parse_config({
        "persistence": {"sqlite_path": str(workdir / "local.sqlite"), "checkpoint_root": str(workdir / "lck")},
        "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny"},
                   {"backend": "transformers", "model_id": "builtin://tiny"}],
    })

    async def latency() -> None:
        worker = ModelWorker(worker_config(cfg.models[0]))
        svc = Service(cfg, {"mock": [worker], "builtin://tiny": [worker]})
        user = User("bench", "k")
        s = await svc.create_session(user)
        ref = await svc.create_run(user, session_id=s.session_id, base_model="mock", lora=LoraConfig(rank=4))
        run_id = (await svc.wait(user, ref.future_id)).result.run_id
        lat = []
        for _ in range(args.calls):
            t = time.perf_counter()
            await svc.get_run(user, run_id)
            lat.append(time.perf_counter() - t)
        out["get_run"] = lat
        op = ForwardBackwardOp(data=[Datum.model_validate(_datum([1, 2]))], forward_only=True)
        lat = []
        for _ in range(args.calls // 2):
            t = time.perf_counter()
            await worker.execute(run_id, op)
            lat.append(time.perf_counter() - t)
        out["forward"] = lat
        await svc.stop()
        await worker.close()

    asyncio.run(latency())
    backend = build_backend(worker_config(cfg.models[1]))
    backend.add_adapter("a", LoraConfig(rank=8, seed=0))
    data = [Datum.model_validate(d) for d in _batch(args.batch, args.seq)]
    for i in range(args.steps + 2):
        if i == 2:
            t = time.perf_counter()
        backend.run_batch([BatchItem(adapter="a", data=data)])
        backend.optim_step("a", AdamParams(learning_rate=1e-3))
    out["train_tok_s"] = args.batch * args.seq * args.steps / (time.perf_counter() - t)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="twinkle-bench-server-"))
    proc, url, key, log = _start_server(workdir)
    try:
        remote = _server_side(url, key, args)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    local = _local_side(args, workdir)
    print(f"launch -> first result: see cold start above; first mock result after ready: "
          f"{remote['first_result_s']:.2f} s")
    print(f"\n{'measure':<34} {'server':>12} {'in-process':>12} {'ratio':>8}")
    for name, label in (("get_run", "GET run (trivial)"), ("forward", "mock forward (submit+wait)")):
        for q, qn in ((0.5, "p50"), (0.99, "p99")):
            r, lo = _pct(remote[name], q) * 1e3, _pct(local[name], q) * 1e3  # type: ignore[arg-type]
            print(f"{label + ' ' + qn + ' (ms)':<34} {r:>12.2f} {lo:>12.3f} {r / lo:>8.1f}x")
    rt, lt = remote["train_tok_s"], local["train_tok_s"]
    print(f"{'train tokens/s, step by step':<34} {rt:>12.0f} {lt:>12.0f} {rt / lt:>8.2f}  (target >= 0.9)")
    rp = remote["train_tok_s_pipelined"]
    print(f"{'train tokens/s, 2 steps in flight':<34} {rp:>12.0f} {lt:>12.0f} {rp / lt:>8.2f}  (target >= 0.9)")
    print("(training rows: builtin://tiny, transformers backend; the local loop runs the same backend in-process)")


if __name__ == "__main__":
    main()
