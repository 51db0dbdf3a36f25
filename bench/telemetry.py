"""Telemetry on vs off, side by side in one run (target: within 5 %).

Two gateways in this process, identical except ``telemetry.enabled`` (each with its own mock-backend
``ModelWorker`` and SQLite file), driven through ``httpx.ASGITransport`` (no sockets, no Ray: the Ray hops are
the same with telemetry on or off, so what differs is all here: the HTTP middleware, the operation tracker,
the scheduler's observer, the usage counters).

1. Trivial forward_backward round trip (submit with ``?wait``, one 8-token datum): requests interleave one by
   one between the two gateways (the order flips each round) so machine noise hits both; p50/p99 per side and the ratio on/off.
2. A scrape of ``/metrics`` (telemetry on) after the run: its latency, so an operator knows what a 15 s scrape
   interval costs.
3. ``--otlp``: the "on" side also runs the OTLP metric push (every ``--otlp-interval`` s, default 1 s, 15x
   the default rate) through the real collect + translate + protobuf encode path; the exporter drops the
   bytes instead of sending them (the network hop runs in a thread, off the request path). Prints the cost
   of one push.
4. Idle CPU: each gateway's lifespan running (reaper etc.) with no requests for ``--idle`` seconds, process
   CPU time measured; telemetry adds no timers, so both should be ~0.

    .venv/bin/python bench/telemetry.py [--requests 400] [--rounds 8] [--idle 10] [--interleave block|request]
                                        [--otlp] [--otlp-interval 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twinkle.server.app import create_app, worker_config  # noqa: E402
from twinkle.server.config import parse_config  # noqa: E402
from twinkle.server.store import Store  # noqa: E402
from twinkle.server.worker import ModelWorker  # noqa: E402

API = "/api/v1/twinkle"
DATUM = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": list(range(5, 13))}]},
         "loss_fn_inputs": {"target_tokens": {"data": list(range(6, 14)), "dtype": "int64"}}}


class _EncodeOnly:
    """An OTLP metric exporter that encodes (the real protobuf work) and drops the bytes."""

    def __init__(self) -> None:
        self.pushes: list[float] = []
        self.bytes = 0

    def export(self, data: object, timeout_millis: float = 0) -> object:
        from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
        from opentelemetry.sdk.metrics.export import MetricExportResult

        self.bytes = len(encode_metrics(data).SerializeToString())  # type: ignore[arg-type]
        return MetricExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _pusher(side: Side, interval: float) -> Any:
    from types import SimpleNamespace

    from twinkle.server.telemetry.otlp_metrics import OtlpMetricsPusher

    tel = SimpleNamespace(metric_export_interval_s=interval, service_name="bench", resource_attributes={})
    return OtlpMetricsPusher(tel, side.app.state.metrics, side.app.state.service, exporter=_EncodeOnly())


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


class Side:
    def __init__(self, work: Path, on: bool):
        cfg = parse_config({
            "persistence": {"sqlite_path": str(work / f"db-{on}.sqlite"), "checkpoint_root": str(work / "ck")},
            "telemetry": {"enabled": on, "prometheus": {"access": "open"}},
            "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny"}],
        })
        store = Store(cfg.persistence.sqlite_file())
        self.key = store.create_key("bench")[1]
        self.app = create_app(cfg, {"mock": [ModelWorker({**worker_config(cfg.models[0]), "telemetry": on})]},
                              store=store)
        self.name = "on" if on else "off"
        self.lat: list[float] = []
        self.seq = 0

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://b",
                                 headers={"X-API-Key": self.key})

    async def setup(self, c: httpx.AsyncClient) -> None:
        sid = (await c.post(f"{API}/sessions", json={"lease_seconds": 3600})).json()["session_id"]
        ref = (await c.post(f"{API}/runs", json={"session_id": sid, "base_model": "mock",
                                                 "lora": {"rank": 4}})).json()
        body = (await c.get(f"{API}/futures/{ref['future_id']}", params={"timeout": 30})).json()
        self.run = body["result"]["run_id"]

    async def step(self, c: httpx.AsyncClient) -> None:
        t0 = time.perf_counter()
        r = await c.post(f"{API}/runs/{self.run}/forward_backward", params={"wait": 10},
                         json={"data": [DATUM], "seq_id": self.seq})
        ref = r.json()
        if (ref.get("state") or {}).get("status") != "complete":
            await c.get(f"{API}/futures/{ref['future_id']}", params={"timeout": 30})
        self.lat.append(time.perf_counter() - t0)
        self.seq += 1


async def _idle_cpu(side: Side, seconds: float, pusher: Any = None) -> float:
    async with side.app.router.lifespan_context(side.app):
        if pusher is not None:
            pusher.start()
        await asyncio.sleep(1.0)
        c0 = time.process_time()
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        cpu = (time.process_time() - c0) / (time.monotonic() - t0) * 100
        if pusher is not None:
            await pusher.stop()
        return cpu


async def main_async(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="twinkle-bench-tel-"))
    off, on = Side(work, False), Side(work, True)
    pusher: Any = _pusher(on, args.otlp_interval) if args.otlp else None
    if pusher is not None:
        pusher.start()
        on.name = "on+otlp"
    async with off.client() as c_off, on.client() as c_on:
        await off.setup(c_off)
        await on.setup(c_on)
        for _ in range(20):  # warm both
            await off.step(c_off)
            await on.step(c_on)
        off.lat.clear()
        on.lat.clear()
        per = max(1, args.requests // args.rounds)
        for r in range(args.rounds):  # the order flips every round
            pair = [(off, c_off), (on, c_on)] if r % 2 == 0 else [(on, c_on), (off, c_off)]
            if args.interleave == "request":  # one by one
                for _ in range(per):
                    for side, c in pair:
                        await side.step(c)
            else:  # a block of requests per side (each side's scheduler thread stays warm)
                for side, c in pair:
                    for _ in range(per):
                        await side.step(c)
        scrape = []
        for _ in range(20):
            t0 = time.perf_counter()
            r = await c_on.get("/metrics")
            scrape.append(time.perf_counter() - t0)
            assert r.status_code == 200
        size = len(r.content)
        if pusher is not None:
            await pusher.stop()
            pushes = []
            for _ in range(20):
                t0 = time.perf_counter()
                assert await pusher.push()
                pushes.append(time.perf_counter() - t0)
    print(f"trivial forward_backward round trip, in-process gateway + mock worker, {len(on.lat)} per side, "
          f"{args.rounds} alternating rounds, interleaved by {args.interleave} "
          f"(load average {os.getloadavg()[0]:.1f})")
    print(f"{'telemetry':<10} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for s in (off, on):
        print(f"{s.name:<10} {_pct(s.lat, .5) * 1e3:>8.3f} {_pct(s.lat, .99) * 1e3:>8.3f} "
              f"{statistics.mean(s.lat) * 1e3:>8.3f}")
    ratio = _pct(on.lat, .5) / _pct(off.lat, .5)
    print(f"p50 on/off = {ratio:.3f} (target <= 1.05: {'OK' if ratio <= 1.05 else 'OVER'})")
    print(f"/metrics scrape: p50 {_pct(scrape, .5) * 1e3:.2f} ms, {size} bytes")
    if pusher is not None:
        print(f"OTLP metric push (collect + translate + encode): p50 {_pct(pushes, .5) * 1e3:.2f} ms, "
              f"{pusher.exporter.bytes} bytes, every {args.otlp_interval:g} s during the run")
    cpu_off = await _idle_cpu(off, args.idle)
    cpu_on = await _idle_cpu(on, args.idle, _pusher(on, args.otlp_interval) if args.otlp else None)
    print(f"idle CPU over {args.idle:.0f} s: off {cpu_off:.2f} % of a core, on {cpu_on:.2f} % "
          f"(difference {cpu_on - cpu_off:+.2f} points)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--idle", type=float, default=10.0)
    ap.add_argument("--interleave", choices=["block", "request"], default="block")
    ap.add_argument("--otlp", action="store_true", help="the on side also pushes metrics over OTLP (encode only)")
    ap.add_argument("--otlp-interval", type=float, default=1.0)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
