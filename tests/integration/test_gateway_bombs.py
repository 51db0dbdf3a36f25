"""Bombs and large internal messages against a REAL gateway (``twinkle-server launch``, Ray Serve, mock backend
in its own worker replica), measured on the process that terminates HTTP.

One server for the module (~20-40 s to start here). The gateway replica's RSS is sampled every 20 ms in a thread
while each bomb is in flight (topk 1e9 through asample + retrieve, a 256 MB zstd body, a 256 MB gzip body, a
sparse tensor of shape [1, 2e7], and sparse float tensors [1, 16M] and [3, 5M] just under the dense-element cap,
an 80 MB chunked body): each is a fast 4xx and the gateway's peak stays within 100 MB of where it started. Then a
legal forward_backward whose gateway -> worker message (7.1 MB) and reply (5.5 MB) are over gRPC's 4 MB default
crosses Ray Serve and trains (with the limit forced to 4 MB it fails as a 413-category user error instead).
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import zstandard

from tests.integration.conftest import ServerHandle, own_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

API = "/api/v1"
BIG_TOKENS, BIG_K = 20_000, 32  # one legal forward_backward with (N, K) targets: op and reply each pass 4 MB
CFG = {
    "auth": {"bootstrap_key_env": None},
    "lease_seconds": 120,
    "limits": {"max_tokens_per_request": BIG_TOKENS},  # max_request_bytes: the shipped 64 MiB
    "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny", "placement": "replica",
                "max_tokens_per_request": BIG_TOKENS, "ray_actor_options": {"num_cpus": 0}}],
}


def _listener(port: int, root: int) -> psutil.Process:
    """The process (under the launcher ``root``) that holds the HTTP port open for listening."""
    procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    for p in procs:
        try:
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port:
                    return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no process under {root} listens on {port}")


class RssProbe:
    """Peak RSS of one process, sampled in a thread while requests are in flight."""

    def __init__(self, proc: psutil.Process):
        self.proc = proc
        self.start_mb = self.now_mb()
        self.peak_mb = self.start_mb
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def now_mb(self) -> float:
        return self.proc.memory_info().rss / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.now_mb())
            time.sleep(0.02)

    def __enter__(self) -> RssProbe:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak_mb = max(self.peak_mb, self.now_mb())


@pytest.fixture(scope="module")
def server() -> Iterator[ServerHandle]:
    pytest.importorskip("ray.serve")
    with own_server(CFG, "twinkle-bombs-") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": server.api_key}, timeout=120) as c:
        yield c


def _result(c: httpx.Client, request_id: str) -> Any:
    """The future's result: a dict (JSON), or the SDK's ForwardBackwardOutput (protobuf replies)."""
    for _ in range(60):
        r = c.post(f"{API}/retrieve_future", json={"request_id": request_id})
        assert r.status_code == 200, r.text
        if "protobuf" in r.headers.get("content-type", ""):
            from tinker.proto.response_conv import deserialize_forward_backward_output

            return deserialize_forward_backward_output(r.content)
        body = r.json()
        if body.get("type") != "try_again":
            return body
    raise AssertionError(f"future {request_id} did not finish")


@pytest.fixture(scope="module")
def run_id(client: httpx.Client) -> str:
    sid = client.post(f"{API}/create_session", json={"tags": []}).json()["session_id"]
    r = client.post(f"{API}/create_model", json={"session_id": sid, "model_seq_id": 0, "base_model": "mock",
                                                 "lora_config": {"rank": 4}})
    assert r.status_code == 200, r.text
    return _result(client, r.json()["request_id"])["model_id"]


def _fb_proto(model_id: str, seq_id: int, shape: list[int], dtype: str) -> bytes:
    """A forward_backward of three tokens whose ``weights`` input is a one-value sparse CSR tensor of ``shape``."""
    from twinkle.server.tinker.codec import pb

    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy")
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.asarray([5, 9, 17], dtype="<i4").tobytes()
    d.loss_fn_inputs["target_tokens"].dtype = pb.DTYPE_INT64
    d.loss_fn_inputs["target_tokens"].dense = np.asarray([9, 17, 33], dtype="<i8").tobytes()
    t = d.loss_fn_inputs["weights"]
    t.dtype = pb.DTYPE_FLOAT32 if dtype == "float32" else pb.DTYPE_INT64
    t.shape.extend(shape)
    t.sparse_csr.values = np.asarray([1], dtype="<f4" if dtype == "float32" else "<i8").tobytes()
    crow = np.ones(shape[0] + 1, dtype="<i8")
    crow[0] = 0
    t.sparse_csr.crow_indices = crow.tobytes()
    t.sparse_csr.col_indices = np.asarray([0], dtype="<i8").tobytes()
    return msg.SerializeToString()


def _compressed(enc: str, n_mb: int) -> bytes:
    z = zstandard.ZstdCompressor(level=3).compressobj() if enc == "zstd" else zlib.compressobj(9, zlib.DEFLATED, 31)
    zero = bytes(1 << 20)
    return b"".join(z.compress(zero) for _ in range(n_mb)) + z.flush()


def _chunks() -> Iterator[bytes]:
    for _ in range(2000):  # 80 MB, no Content-Length
        yield b"\0" * 40_000


def _bombs(c: httpx.Client, run: str) -> Iterator[tuple[str, httpx.Response]]:
    proto = {"content-type": "application/x-protobuf"}
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]}
    yield "topk", c.post(f"{API}/asample", json={
        "prompt": prompt, "base_model": "mock", "prompt_logprobs": True, "topk_prompt_logprobs": 1_000_000_000,
        "sampling_params": {"max_tokens": 1}})
    # the legal top-k, then a retrieve whose request id claims a huge k
    r = c.post(f"{API}/asample", json={"prompt": prompt, "base_model": "mock", "prompt_logprobs": True,
                                       "topk_prompt_logprobs": 20, "sampling_params": {"max_tokens": 1}})
    assert r.status_code == 200, r.text
    fid = r.json()["request_id"].split("|")[0]
    yield "topk-forged", c.post(f"{API}/retrieve_future", json={"request_id": f"{fid}|smp||1000000000"})
    for enc in ("zstd", "gzip"):
        yield enc, c.post(f"{API}/forward_backward", content=_compressed(enc, 256),
                          headers={**proto, "content-encoding": enc})
    yield "sparse-2e7", c.post(f"{API}/forward_backward", content=_fb_proto(run, 1, [1, 20_000_000], "int64"),
                               headers=proto)
    yield "sparse-16M-float", c.post(f"{API}/forward_backward", content=_fb_proto(run, 2, [1, 16_000_000], "float32"),
                                     headers=proto)
    yield "sparse-3x5M-float", c.post(f"{API}/forward_backward", content=_fb_proto(run, 3, [3, 5_000_000], "float32"),
                                      headers=proto)
    try:
        yield "chunked", c.post(f"{API}/forward_backward", content=_chunks(), headers=proto)
    except httpx.TransportError as e:  # refused while the client still sends: the reply may be cut off
        raise AssertionError(f"chunked body: no reply ({e!r})") from None


def test_bombs_are_refused_fast_and_the_gateway_stays_small(server: ServerHandle, client: httpx.Client,
                                                            run_id: str) -> None:
    assert server.proc is not None
    gateway = _listener(server.port, server.proc.pid)
    figures: dict[str, tuple[int, float, float]] = {}
    with RssProbe(gateway) as probe:
        t = time.monotonic()
        for name, r in _bombs(client, run_id):
            took = time.monotonic() - t
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
            assert set(r.json()) >= {"error", "category", "detail"}, (name, r.text)
            assert took < 30, (name, took)  # 0.01-1.4 s here (gzip: up to 8 s at load 12)
            figures[name] = (r.status_code, round(took, 2), round(probe.peak_mb - probe.start_mb, 1))
            t = time.monotonic()
    print(f"\ngateway pid {gateway.pid}: start {probe.start_mb:.0f} MB, peak {probe.peak_mb:.0f} MB, "
          f"end {probe.now_mb():.0f} MB; per bomb (status, s, peak growth MB so far): {figures}")
    assert probe.peak_mb - probe.start_mb < 100, figures
    assert client.get(f"{API}/healthz").status_code == 200
    assert client.get(f"{API}/training_runs").status_code == 200


def _big_datums(total: int, k: int, per: int = 1000) -> list[dict]:
    """Top-K distillation-style datums: (N, K) target tokens and weights (SDFT's shape)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(total // per):
        toks = rng.integers(3, 250, size=per).tolist()
        targets = rng.integers(3, 250, size=per * k).tolist()
        weights = rng.random(per * k).round(6).tolist()
        out.append({"model_input": {"chunks": [{"type": "encoded_text", "tokens": toks}]},
                    "loss_fn_inputs": {"target_tokens": {"data": targets, "dtype": "int64", "shape": [per, k]},
                                       "weights": {"data": weights, "dtype": "float32", "shape": [per, k]}}})
    return out


def test_a_legal_request_over_4mb_internally_trains(server: ServerHandle, client: httpx.Client,
                                                    run_id: str) -> None:
    """20 000 tokens with (N, 32) targets and weights in one forward_backward (JSON, ~9 MB on the wire): the
    op the gateway sends the worker replica over Serve's gRPC data plane is 7.1 MB and the reply (a logprob per
    target) 5.5 MB, both over gRPC's 4 MB default. It trains; the optimizer step after it too."""
    import pickle

    data = _big_datums(BIG_TOKENS, BIG_K)
    assert len(pickle.dumps(data)) > 6 << 20
    r = client.post(f"{API}/forward_backward", json={
        "model_id": run_id, "seq_id": 4, "forward_backward_input": {"data": data, "loss_fn": "cross_entropy"}})
    assert r.status_code == 200, r.text
    out = _result(client, r.json()["request_id"])
    assert not isinstance(out, dict), str(out)[:2000]  # a dict here is an error
    assert len(out.loss_fn_outputs) == len(data)
    assert out.loss_fn_outputs[-1]["logprobs"].shape == [1000, BIG_K]
    assert np.isfinite(out.metrics["loss:sum"])
    r = client.post(f"{API}/optim_step", json={"model_id": run_id, "seq_id": 5,
                                               "adam_params": {"learning_rate": 1e-3}})
    assert r.status_code == 200, r.text
    assert "error" not in _result(client, r.json()["request_id"])
