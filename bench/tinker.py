"""Tinker-compatibility overhead, measured side by side in one run (servers measured in alternation).

1. Latency of a trivial forward_backward round trip (1 datum, 2 tokens, mock backend) through the unmodified
   Tinker SDK (submit + retrieve_future), next to the same round trip with raw HTTP on the Tinker routes and
   through the native ``twinkle_client``: p50 / p99 in ms. Measured on the real server (``twinkle-server
   launch`` with its default config, and variants: HAProxy ingress, the worker in its own replica, Ray Serve's
   Python proxy actor; ``--before-tree`` adds a server run from another checkout) and, for reference, on the
   gateway app with
   an in-process worker under uvicorn (no Ray hops; shares this process's GIL). ``GET healthz`` is the floor
   of one HTTP round trip through each server.
2. SFT throughput (forward_backward + optim_step on builtin://tiny, transformers backend): tokens/s through the
   Tinker SDK vs the native client, with the ratio.

The throughput server is the gateway app (``create_app`` + in-process ``ModelWorker``) under uvicorn on loopback.

    .venv/bin/python bench/tinker.py [--n 200] [--steps 10] [--batch 8] [--seq 64] [--servers ray,ray-haproxy,ray-replica,ray-serveproxy,uvicorn] [--before-tree /work/main]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")
ROOT = Path(__file__).resolve().parents[1]
# this file is named tinker.py: keep bench/ off the path so ``import tinker`` finds the SDK
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))


def _start(backend: str) -> tuple[str, str]:
    os.environ["TWINKLE_TEST_BACKEND"] = backend
    import _tinker_server

    _tinker_server._cached = None
    return _tinker_server.start_inprocess()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _row(name: str, xs: list[float]) -> str:
    ms = [x * 1000 for x in xs]
    return f"| {name:<34} | {statistics.median(ms):8.2f} | {_pct(ms, 0.99):8.2f} |"


def _serverproc() -> Any:
    """bench/_serverproc.py, loaded by path (bench/ stays off sys.path: this file shadows ``tinker``)."""
    import importlib.util

    if "_serverproc" in sys.modules:
        return sys.modules["_serverproc"]
    spec = importlib.util.spec_from_file_location("_serverproc", ROOT / "bench" / "_serverproc.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_serverproc"] = mod
    spec.loader.exec_module(mod)
    return mod


def _start_ray(workdir: Path, proxy: str | None = "haproxy", placement: str | None = "auto",
               tree: str | None = None) -> tuple[Any, str, str]:
    """``tree``: run the server from another checkout (``PYTHONPATH``), e.g. main, with that tree's defaults."""
    sp = _serverproc()
    model = dict(sp.MOCK_MODEL) if placement is None else {**sp.MOCK_MODEL, "placement": placement}
    cfg, url = sp.write_config(workdir, [model], proxy=proxy)
    key = sp.create_key(cfg)
    log = workdir / "server.log"
    proc = sp.launch(cfg, log, env={"PYTHONPATH": tree} if tree else None, cwd=tree)
    sp.wait_healthy(proc, url, log)
    return proc, url, key


class _Prober:
    """The four round trips of one server, set up once, so several servers can be measured in alternation."""

    def __init__(self, url: str, key: str, base_model: str, label: str):
        import httpx
        import tinker
        from tinker import types as tt

        import twinkle_client
        from twinkle_client.model import MockModel

        self.label = label
        self.times: dict[str, list[float]] = {k: [] for k in ("floor", "sdk", "raw", "native")}
        self.client_cpu: dict[str, float] = {}
        self._plain = httpx.Client(base_url=url)
        self._sc = tinker.ServiceClient(base_url=url, api_key=key)
        self._tc = self._sc.create_lora_training_client(base_model=base_model, rank=4).result()
        self._datum = tt.Datum(model_input=tt.ModelInput.from_ints([1]),
                               loss_fn_inputs={"target_tokens": [2], "weights": [1.0]})
        self._raw = httpx.Client(base_url=url + "/api/v1", headers={"X-API-Key": key})
        self._sid = self._raw.post("/create_session", json={"tags": [], "sdk_version": "bench"}).json()["session_id"]
        rid = self._raw.post("/create_model", json={"session_id": self._sid, "model_seq_id": 0,
                                                    "base_model": base_model, "lora_config": {"rank": 4}}).json()
        self._mid = self._raw.post("/retrieve_future", json={"request_id": rid["request_id"]}).json()["model_id"]
        self._seq = 0
        twinkle_client.init_twinkle_client(url, api_key=key)
        self._model = MockModel(base_model)
        self._model.add_adapter_to_model("bench", r=4)

    def _time(self, name: str, fn: Any, n: int, keep: bool) -> None:
        cpu = time.process_time()
        for _ in range(n):
            t = time.perf_counter()
            fn()
            if keep:
                self.times[name].append(time.perf_counter() - t)
        if keep:  # this (client) process's CPU per call, all its threads: what the client itself costs
            self.client_cpu[name] = self.client_cpu.get(name, 0.0) + (time.process_time() - cpu)

    def round(self, n: int, keep: bool = True) -> None:
        from tinker import types as tt
        from tinker.proto.request_conv import forward_backward_request_to_proto

        def raw() -> None:
            self._seq += 1
            req = tt.ForwardBackwardRequest(
                forward_backward_input=tt.ForwardBackwardInput(data=[self._datum], loss_fn="cross_entropy"),
                model_id=self._mid, seq_id=self._seq)
            r = self._raw.post("/forward_backward", content=forward_backward_request_to_proto(req).SerializeToString(),
                               headers={"Content-Type": "application/x-protobuf"})
            self._raw.post("/retrieve_future", json={"request_id": r.json()["request_id"]},
                           headers={"Accept": "application/x-protobuf"})

        self._time("floor", lambda: self._plain.get("/api/v1/healthz").raise_for_status(), n, keep)
        self._time("sdk", lambda: self._tc.forward_backward([self._datum], "cross_entropy").result(), n, keep)
        self._time("raw", raw, n, keep)
        self._time("native", lambda: self._model.forward_backward(inputs=[{"input_ids": [1, 2]}]), n, keep)

    def close(self) -> None:
        self._raw.post(f"/sessions/{self._sid}/finish", json={})
        self._sc.close("success").result()

    def report(self) -> list[str]:
        t = self.times
        return [
            f"Trivial forward_backward round trip (1 datum, 2 tokens; mock backend), {self.label}, n={len(t['sdk'])}",
            "| path                               |  p50 ms  |  p99 ms  |",
            "|------------------------------------|----------|----------|",
            _row("GET healthz (one HTTP round trip)", t["floor"]),
            _row("tinker SDK (submit + retrieve)", t["sdk"]),
            _row("raw HTTP on the Tinker routes", t["raw"]),
            _row("native twinkle_client", t["native"]),
            f"SDK / raw HTTP p50 ratio: {statistics.median(t['sdk']) / statistics.median(t['raw']):.2f}x; "
            f"SDK / native p50 ratio: {statistics.median(t['sdk']) / statistics.median(t['native']):.2f}x",
            "client process CPU per call (ms): " + ", ".join(
                f"{k} {self.client_cpu.get(k, 0.0) / max(1, len(t[k])) * 1000:.2f}" for k in t),
        ]


def latency_side_by_side(probers: list[_Prober], n: int, chunk: int = 10) -> list[str]:
    """Every server measured in alternating chunks of ``chunk`` calls per path, so a load change on the machine
    hits them alike; then the per-server tables and the p50 ratios against the first server."""
    for p in probers:
        p.round(5, keep=False)  # warm-up
    done = 0
    while done < n:
        k = min(chunk, n - done)
        for p in probers:
            p.round(k)
        done += k
    out: list[str] = []
    for p in probers:
        out += p.report() + [""]
    if len(probers) > 1:
        base = probers[0]
        out.append(f"p50 ratios against '{base.label}' (same run, alternating chunks of {chunk}):")
        for p in probers[1:]:
            ratios = ", ".join(f"{name} {statistics.median(p.times[name]) / statistics.median(base.times[name]):.2f}"
                               for name in ("floor", "sdk", "raw", "native"))
            out.append(f"  {p.label}: {ratios}")
    return out


def throughput(url: str, key: str, steps: int, batch: int, seq: int) -> list[str]:
    import numpy as np
    import tinker
    from tinker import types as tt

    import twinkle_client
    from twinkle_client.model import TransformersModel

    rng = np.random.default_rng(0)
    rows = [rng.integers(3, 1000, size=seq).tolist() for _ in range(batch)]
    tokens_per_step = batch * (seq - 1)

    sc = tinker.ServiceClient(base_url=url, api_key=key)
    tc = sc.create_lora_training_client(base_model="builtin://tiny", rank=8).result()
    data = [tt.Datum(model_input=tt.ModelInput.from_ints(r[:-1]),
                     loss_fn_inputs={"target_tokens": r[1:], "weights": [1.0] * (seq - 1)}) for r in rows]
    tc.forward_backward(data, "cross_entropy").result()  # warm-up
    tc.optim_step(tt.AdamParams(learning_rate=1e-4)).result()
    t = time.perf_counter()
    for _ in range(steps):
        fb = tc.forward_backward(data, "cross_entropy")
        op = tc.optim_step(tt.AdamParams(learning_rate=1e-4))
        fb.result()
        op.result()
    sdk_tps = steps * tokens_per_step / (time.perf_counter() - t)
    sc.close("success").result()

    twinkle_client.init_twinkle_client(url, api_key=key)
    model = TransformersModel("builtin://tiny")
    model.add_adapter_to_model("bench-sft", r=8)
    inputs = [{"input_ids": r} for r in rows]
    model.forward_backward(inputs=inputs)
    model.clip_grad_and_step()
    t = time.perf_counter()
    for _ in range(steps):
        model.forward_backward(inputs=inputs)
        model.clip_grad_and_step()
    native_tps = steps * tokens_per_step / (time.perf_counter() - t)
    return [
        f"SFT throughput (builtin://tiny, transformers, batch {batch} x {seq} tokens, {steps} steps)",
        "| client                | tokens/s |",
        "|-----------------------|----------|",
        f"| tinker SDK            | {sdk_tps:8.0f} |",
        f"| native twinkle_client | {native_tps:8.0f} |",
        f"tinker SDK / native: {sdk_tps / native_tps:.2f}x",
    ]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--servers", default="ray,ray-serveproxy,uvicorn",
                   help="latency on: ray (twinkle-server launch, default config), ray-haproxy (http.proxy: haproxy), "
                        "ray-replica (haproxy, the worker in its own replica: placement: replica), ray-serveproxy "
                        "(http.proxy: serve), uvicorn (the gateway app without Ray)")
    p.add_argument("--before-tree", default=None,
                   help="also measure a server run from this checkout (e.g. /work/main) with its default config, "
                        "first in the table: the ratios are against it")
    args = p.parse_args()
    servers = [s for s in args.servers.split(",") if s]
    print(f"load average at start: {os.getloadavg()}")
    out: list[str] = []
    procs: list[Any] = []
    probers: list[_Prober] = []
    try:
        if args.before_tree:
            workdir = Path(tempfile.mkdtemp(prefix="twinkle-bench-tinker-"))
            proc, url, key = _start_ray(workdir, None, None, args.before_tree)
            procs.append(proc)
            probers.append(_Prober(url, key, "mock", f"before: real server from {args.before_tree}, its defaults"))
        for kind, proxy, placement, label in (
                ("ray", None, None, "real server, default config (direct ingress, worker in the gateway)"),
                ("ray-haproxy", "haproxy", "auto", "real server (HAProxy ingress, worker in the gateway)"),
                ("ray-replica", "haproxy", "replica", "real server (HAProxy ingress, worker in its own replica)"),
                ("ray-serveproxy", "serve", "auto", "real server (Python proxy actor, worker in the gateway)")):
            if kind not in servers:
                continue
            workdir = Path(tempfile.mkdtemp(prefix="twinkle-bench-tinker-"))
            proc, url, key = _start_ray(workdir, proxy, placement)
            procs.append(proc)
            probers.append(_Prober(url, key, "mock", label))
        if "uvicorn" in servers:
            url, key = _start("mock")
            probers.append(_Prober(url, key, "builtin://tiny", "gateway app + in-process worker under uvicorn"))
        out += latency_side_by_side(probers, args.n) + [f"load average after latency: {os.getloadavg()}", ""]
        for p in probers:
            p.close()
    finally:
        for proc in procs:
            _serverproc().stop(proc)
    if args.steps <= 0:
        print("\n".join(out))
        return
    url2, key2 = _start("transformers")
    out += throughput(url2, key2, args.steps, args.batch, args.seq)
    out.append(f"load average at end: {os.getloadavg()}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
