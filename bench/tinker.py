"""Tinker-compatibility overhead, measured side by side in one run against ONE server.

1. Latency of a trivial forward_backward round trip (1 datum, 2 tokens, mock backend) through the unmodified
   Tinker SDK (submit + retrieve_future), next to the same round trip with raw HTTP on the Tinker routes and
   through the native ``twinkle_client``: p50 / p99 in ms. Measured on the real server (``twinkle-server
   launch``: HAProxy -> gateway replica -> worker replica; and with ``http.proxy: serve``, Ray Serve's Python
   proxy actor in place of HAProxy) and, for reference, on the gateway app with
   an in-process worker under uvicorn (no Ray hops; shares this process's GIL). ``GET healthz`` is the floor
   of one HTTP round trip through each server.
2. SFT throughput (forward_backward + optim_step on builtin://tiny, transformers backend): tokens/s through the
   Tinker SDK vs the native client, with the ratio.

The throughput server is the gateway app (``create_app`` + in-process ``ModelWorker``) under uvicorn on loopback.

    .venv/bin/python bench/tinker.py [--n 200] [--steps 10] [--batch 8] [--seq 64] [--servers ray,ray-serveproxy,uvicorn]
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


def _start_ray(workdir: Path, proxy: str = "haproxy") -> tuple[Any, str, str]:
    sp = _serverproc()
    cfg, url = sp.write_config(workdir, [sp.MOCK_MODEL], proxy=proxy)
    key = sp.create_key(cfg)
    log = workdir / "server.log"
    proc = sp.launch(cfg, log)
    sp.wait_healthy(proc, url, log)
    return proc, url, key


def latency(url: str, key: str, n: int, base_model: str = "builtin://tiny", label: str = "") -> list[str]:
    import httpx
    import tinker
    from tinker import types as tt
    from tinker.proto.request_conv import forward_backward_request_to_proto

    import twinkle_client
    from twinkle_client.model import MockModel

    floor = []
    with httpx.Client(base_url=url) as c:
        for i in range(n + 10):
            t = time.perf_counter()
            c.get("/api/v1/healthz").raise_for_status()
            if i >= 10:
                floor.append(time.perf_counter() - t)

    sc = tinker.ServiceClient(base_url=url, api_key=key)
    tc = sc.create_lora_training_client(base_model=base_model, rank=4).result()
    datum = tt.Datum(model_input=tt.ModelInput.from_ints([1]), loss_fn_inputs={"target_tokens": [2], "weights": [1.0]})
    sdk = []
    for i in range(n + 10):
        t = time.perf_counter()
        tc.forward_backward([datum], "cross_entropy").result()
        if i >= 10:
            sdk.append(time.perf_counter() - t)

    raw = []
    with httpx.Client(base_url=url + "/api/v1", headers={"X-API-Key": key}) as c:
        sid = c.post("/create_session", json={"tags": [], "sdk_version": "bench"}).json()["session_id"]
        rid = c.post("/create_model", json={"session_id": sid, "model_seq_id": 0, "base_model": base_model,
                                            "lora_config": {"rank": 4}}).json()["request_id"]
        mid = c.post("/retrieve_future", json={"request_id": rid}).json()["model_id"]
        for i in range(n + 10):
            req = tt.ForwardBackwardRequest(
                forward_backward_input=tt.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"),
                model_id=mid, seq_id=i + 1)
            body = forward_backward_request_to_proto(req).SerializeToString()
            t = time.perf_counter()
            r = c.post("/forward_backward", content=body, headers={"Content-Type": "application/x-protobuf"})
            c.post("/retrieve_future", json={"request_id": r.json()["request_id"]},
                   headers={"Accept": "application/x-protobuf"})
            if i >= 10:
                raw.append(time.perf_counter() - t)
        c.post(f"/sessions/{sid}/finish", json={})

    twinkle_client.init_twinkle_client(url, api_key=key)
    model = MockModel(base_model)
    model.add_adapter_to_model("bench", r=4)
    native = []
    for i in range(n + 10):
        t = time.perf_counter()
        model.forward_backward(inputs=[{"input_ids": [1, 2]}])
        if i >= 10:
            native.append(time.perf_counter() - t)
    sc.close("success").result()
    return [
        f"Trivial forward_backward round trip (1 datum, 2 tokens; mock backend), {label}, n={n}",
        "| path                               |  p50 ms  |  p99 ms  |",
        "|------------------------------------|----------|----------|",
        _row("GET healthz (one HTTP round trip)", floor),
        _row("tinker SDK (submit + retrieve)", sdk),
        _row("raw HTTP on the Tinker routes", raw),
        _row("native twinkle_client", native),
        f"SDK / raw HTTP p50 ratio: {statistics.median(sdk) / statistics.median(raw):.2f}x; "
        f"SDK / native p50 ratio: {statistics.median(sdk) / statistics.median(native):.2f}x",
    ]


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
                   help="latency on: ray (twinkle-server launch, default HAProxy ingress), ray-serveproxy (the same "
                        "with http.proxy: serve), uvicorn (the gateway app without Ray)")
    args = p.parse_args()
    servers = [s for s in args.servers.split(",") if s]
    print(f"load average at start: {os.getloadavg()}")
    out: list[str] = []
    for kind, proxy, label in (("ray", "haproxy", "real server (Ray Serve, HAProxy ingress: the default)"),
                               ("ray-serveproxy", "serve", "real server (Ray Serve, Python proxy actor)")):
        if kind not in servers:
            continue
        workdir = Path(tempfile.mkdtemp(prefix="twinkle-bench-tinker-"))
        proc, url, key = _start_ray(workdir, proxy)
        try:
            out += latency(url, key, args.n, "mock", label) + [""]
        finally:
            _serverproc().stop(proc)
    if "uvicorn" in servers:
        url, key = _start("mock")
        out += latency(url, key, args.n, "builtin://tiny", "gateway app + in-process worker under uvicorn") + [""]
    if args.steps <= 0:
        print("\n".join(out))
        return
    url2, key2 = _start("transformers")
    out += throughput(url2, key2, args.steps, args.batch, args.seq)
    out.append(f"load average at end: {os.getloadavg()}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
