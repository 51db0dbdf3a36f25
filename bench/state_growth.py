"""Does a trivial call get slower as stored state grows? Side by side, one run.

For each size N, a fresh SQLite store is filled with N old sessions (other users), N runs, N checkpoints and
N completed future results, a ``Service`` (mock worker, in process) loads it, and a fresh user's trivial
calls are timed (p50 over ``--calls``): heartbeat, get_run, long-poll of a finished future, list_runs (own),
create_session, a mock forward (submit + wait), status, and one lease-reaper tick. The table shows each
call's p50 at each size and the ratio to the smallest size (flat = 1.0).

    .venv/bin/python bench/state_growth.py [--sizes 0,2000,20000] [--calls 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twinkle.server.app import worker_config  # noqa: E402
from twinkle.server.config import parse_config  # noqa: E402
from twinkle.server.ops import ForwardBackwardOp  # noqa: E402
from twinkle.server.service import Service, User  # noqa: E402
from twinkle.server.store import Store  # noqa: E402
from twinkle.server.worker import ModelWorker  # noqa: E402
from twinkle.types import LoraConfig, datum_from_tokens  # noqa: E402


def _fill(store: Store, n: int, ck_root: Path) -> None:
    now = time.time()
    lora = {"rank": 4, "alpha": 8.0}
    sessions, runs, ckpts, futures = [], [], [], []
    for i in range(n):
        user = f"u{i % 500}"
        sid = f"sold{i:08d}"
        sessions.append((sid, user, json.dumps({
            "session_id": sid, "user": user, "client": "twinkle", "state": "closed", "created_at": now - 9e4,
            "last_heartbeat": now - 9e4, "lease_seconds": 60.0, "metadata": {}, "run_ids": [f"{sid}:train:0"]})))
        rid = f"{sid}:train:0"
        runs.append((rid, user, sid, json.dumps({
            "run_id": rid, "session_id": sid, "user": user, "base_model": "mock", "lora": lora, "state": "unloaded",
            "step": 10, "created_at": now - 9e4})))
        ckpts.append((rid, "training", "c", user, str(ck_root / user / rid), json.dumps({
            "checkpoint_id": "weights/c", "run_id": rid, "name": "c", "kind": "training",
            "path": f"tinker://{rid}/weights/c", "created_at": now - 9e4, "step": 10})))
        futures.append((f"fold{i:08d}", user, now + 3000, json.dumps({"future_id": f"fold{i:08d}", "status": "complete",
                                                                     "type": "forward", "result": {}})))
    db = store._db
    with store._lock:
        db.execute("BEGIN")
        db.executemany("INSERT INTO sessions (session_id, user, data) VALUES (?,?,?)", sessions)
        db.executemany("INSERT INTO runs (run_id, user, session_id, data) VALUES (?,?,?,?)", runs)
        db.executemany("INSERT INTO checkpoints (run_id, kind, name, user, dir, data) VALUES (?,?,?,?,?,?)", ckpts)
        db.executemany("INSERT INTO futures (future_id, user, expires_at, data) VALUES (?,?,?,?)", futures)
        db.execute("COMMIT")


async def _p50(fn, calls: int) -> float:
    xs = []
    for _ in range(calls):
        t = time.perf_counter()
        await fn()
        xs.append(time.perf_counter() - t)
    return statistics.median(xs)


async def _measure(n: int, calls: int) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="twinkle-growth-"))
    cfg = parse_config({
        "persistence": {"sqlite_path": str(work / "db.sqlite"), "checkpoint_root": str(work / "ck")},
        "limits": {"max_adapters_per_user": 100000},
        "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny", "max_adapters": 100000}],
    })
    store = Store(cfg.persistence.sqlite_file())
    _fill(store, n, work / "ck")
    t0 = time.perf_counter()
    svc = Service(cfg, {"mock": [ModelWorker(worker_config(cfg.models[0]))]}, store=store)
    load_s = time.perf_counter() - t0
    me = User("bench", "k")
    s = await svc.create_session(me)
    run = (await svc.wait(me, (await svc.create_run(
        me, session_id=s.session_id, base_model="mock", lora=LoraConfig(rank=4))).future_id, 30)).result
    data = [datum_from_tokens([1, 2, 3])]
    done = await svc.submit(me, run.run_id, ForwardBackwardOp(data=data, forward_only=True))
    await svc.wait(me, done.future_id, 30)

    async def forward() -> None:
        ref = await svc.submit(me, run.run_id, ForwardBackwardOp(data=data, forward_only=True))
        await svc.wait(me, ref.future_id, 30)

    async def create_session() -> None:
        await svc.create_session(me)

    out = {
        "load state (s)": load_s,
        "heartbeat": await _p50(lambda: svc.heartbeat(me, s.session_id), calls),
        "get_run": await _p50(lambda: svc.get_run(me, run.run_id), calls),
        "wait (done future)": await _p50(lambda: svc.wait(me, done.future_id, 0), calls),
        "list_runs (own)": await _p50(lambda: svc.list_runs(me), calls),
        "create_session": await _p50(create_session, calls),
        "forward (mock)": await _p50(forward, calls // 2),
        "status": await _p50(svc.status, max(10, calls // 10)),
        "reaper tick": await _p50(svc.reap, max(10, calls // 10)),
    }
    await svc.stop()
    store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="0,2000,20000")
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    results = {n: asyncio.run(_measure(n, args.calls)) for n in sizes}
    base = results[sizes[0]]
    head = f"{'p50 (ms) / N stored':<22}" + "".join(f"{n:>12}" for n in sizes) + f"{'ratio max/min N':>18}"
    print(head)
    for key in base:
        vals = [results[n][key] for n in sizes]
        scale = 1.0 if key.endswith("(s)") else 1000.0
        ratio = vals[-1] / base[key] if base[key] > 0 else float("nan")
        print(f"{key:<22}" + "".join(f"{v * scale:>12.3f}" for v in vals) + f"{ratio:>18.2f}")
    print(f"(load average {os.getloadavg()[0]:.1f}; 'load state' is seconds, the rest milliseconds)")


if __name__ == "__main__":
    main()
