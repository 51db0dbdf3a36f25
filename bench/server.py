"""Server overhead, measured side by side in one run.

1. Round-trip latency (p50/p99) of a trivial call: ``GET runs/{id}`` over HTTP through the Ray Serve server vs
   ``Service.get_run`` in process; and a 1-token mock ``forward`` (submit + long-poll) through the server vs
   ``ModelWorker.execute`` in process.
2. Training throughput (tokens/s of forward_backward + clip_grad_and_step) of ONE training script written
   against the local API, run with ``twinkle.model.TransformersModel`` in this process and with
   ``twinkle_client.model.TransformersModel`` against the server (the import swap), on the same model and
   batches. Rounds of local and server steps alternate so that a noisy shared machine affects both; the
   per-step medians are compared. Target: ratio >= 0.9. Rows: the blocking loop (each call waits for its
   result), the same loop with ``*_async`` calls keeping the next step queued behind the current one, and
   for reference the bare backend (no API, data validated once).

    .venv/bin/python bench/server.py [--models builtin://tiny,builtin://small] [--steps 8] [--rounds 3] [--batch 8] [--seq 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
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


def _start_server(workdir: Path, models: list[str]) -> tuple[subprocess.Popen, str, str, Path]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = {
        "http": {"host": "127.0.0.1", "port": port}, "auth": {"bootstrap_key_env": None},
        "persistence": {"sqlite_path": str(workdir / "db.sqlite"), "checkpoint_root": str(workdir / "ck")},
        "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny", "ray_actor_options": {"num_cpus": 0}},
                   *({"backend": "transformers", "model_id": m, "ray_actor_options": {"num_cpus": 0}} for m in models)],
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
    return out


def _steps(model: object, data: list[dict], n: int, pipelined: bool) -> list[float]:
    """Seconds per training step of the user-level loop (``model`` is a local or a remote TransformersModel)."""
    times = []
    if not pipelined:
        for _ in range(n):
            t = time.perf_counter()
            model.forward_backward(inputs=data)  # type: ignore[attr-defined]
            model.clip_grad_and_step()  # type: ignore[attr-defined]
            times.append(time.perf_counter() - t)
        return times
    # keep the next step queued on the server while the current one runs; results still awaited in order
    pending: list[tuple[object, object]] = []
    t = time.perf_counter()
    for _ in range(n + 1):
        if len(pending) < n:
            pending.append((model.forward_backward_async(inputs=data),  # type: ignore[attr-defined]
                            model.optim_step_async()))  # type: ignore[attr-defined]
        if len(pending) == 2 or (len(pending) == 1 and len(times) == n - 1):
            for fut in pending.pop(0):
                fut.result()  # type: ignore[attr-defined]
            now = time.perf_counter()
            times.append(now - t)
            t = now
    return times


def _throughput(url: str, key: str, model_id: str, args: argparse.Namespace) -> tuple[dict[str, list[float]], int]:
    """Alternating rounds of the same loop: local API in this process, then the import-swapped client.
    Returns per-step seconds per loop and the steps per round (fewer for slow models: about 4 s a round)."""
    import twinkle_client
    from twinkle.model import TransformersModel as LocalModel
    from twinkle.model.base import BatchItem
    from twinkle.types import AdamParams, Datum
    from twinkle_client.model import TransformersModel as RemoteModel

    data = _batch(args.batch, args.seq)
    local = LocalModel(model_id, seed=0)
    local.add_adapter_to_model("bench", rank=8)
    session = twinkle_client.init_twinkle_client(url, key)
    remote = RemoteModel(model_id, session=session)
    remote.add_adapter_to_model("bench", rank=8)
    bare = [Datum.model_validate(d) for d in data]
    backend, name = local.backend, local._name("bench")

    def bare_steps(n: int) -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            backend.run_batch([BatchItem(adapter=name, data=bare)])
            backend.optim_step(name, AdamParams(learning_rate=1e-4))
            times.append(time.perf_counter() - t)
        return times

    out: dict[str, list[float]] = {"local": [], "server": [], "server_async": [], "bare": []}
    steps = args.steps
    for r in range(args.rounds + 1):  # round 0 warms every path up and is not counted
        n = 2 if r == 0 else steps
        got = {"local": _steps(local, data, n, False), "server": _steps(remote, data, n, False),
               "server_async": _steps(remote, data, n, True), "bare": bare_steps(n)}
        if r:
            for k, v in got.items():
                out[k].extend(v)
        else:
            steps = max(2, min(args.steps, round(4.0 / statistics.median(got["local"]))))
    session.close()
    return out, steps


def _local_side(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    from twinkle.server.app import worker_config
    from twinkle.server.config import parse_config
    from twinkle.server.ops import ForwardBackwardOp
    from twinkle.server.service import Service, User
    from twinkle.server.worker import ModelWorker
    from twinkle.types import Datum, LoraConfig

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
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="builtin://tiny,builtin://small",
                   help="comma-separated builtin/hub models to train on")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="twinkle-bench-server-"))
    models = [m for m in args.models.split(",") if m]
    proc, url, key, log = _start_server(workdir, models)
    try:
        remote = _server_side(url, key, args)
        train = {m: _throughput(url, key, m, args) for m in models}
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
    tokens = args.batch * args.seq
    print(f"\ntraining, batch {args.batch} x {args.seq} tokens, {args.rounds} alternating rounds (per-step medians; "
          "tokens/s)")
    print(f"{'model':<16} {'loop':<46} {'server':>8} {'local':>8} {'ratio':>6} {'+ms/step':>9}")
    for m, (times, steps) in train.items():
        med = {k: statistics.median(v) for k, v in times.items()}
        lt = tokens / med["local"]
        for k, label in (("server", "blocking: forward_backward + clip_grad_and_step"),
                         ("server_async", "*_async, next step queued behind the current")):
            rt = tokens / med[k]
            print(f"{m:<16} {label:<46} {rt:>8.0f} {lt:>8.0f} {rt / lt:>6.2f} {(med[k] - med['local']) * 1e3:>9.1f}"
                  "  (target ratio >= 0.9)")
        bt = tokens / med["bare"]
        print(f"{m:<16} {'local API vs bare backend (reference)':<46} {lt:>8.0f} {bt:>8.0f} {lt / bt:>6.2f} "
              f"{(med['local'] - med['bare']) * 1e3:>9.1f}   ({steps} steps a round; local step "
              f"{med['local'] * 1e3:.0f} ms)")
    print("('local' = the same script with twinkle.model in this process; 'bare' = the backend's run_batch + "
          "optim_step on pre-validated data; +ms/step = the server's (or API's) extra time per step)")

if __name__ == "__main__":
    main()
