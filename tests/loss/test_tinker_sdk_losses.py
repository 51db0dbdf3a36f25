"""The unmodified Tinker SDK against the gateway app (mock worker, uvicorn in this process): loss defaults,
refused configs and non-finite steps as a Tinker program sees them (issue 12 items 3 and 16)."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

tinker = pytest.importorskip("tinker")
from tinker import types as tt  # noqa: E402

pytestmark = pytest.mark.slow  # starts a server (uvicorn, in process) and takes seconds

KEY = "tml-loss-sdk-test"
BASE = "mock"


@pytest.fixture(scope="module")
def service_client() -> Iterator[object]:
    import uvicorn

    from twinkle.server.app import create_app, worker_config
    from twinkle.server.config import parse_config
    from twinkle.server.worker import ModelWorker

    d = tempfile.mkdtemp(prefix="twinkle-loss-sdk-")
    cfg = parse_config({
        "models": [{"name": BASE, "backend": "mock", "model_id": "mock://tiny"}],
        "persistence": {"sqlite_path": f"{d}/db.sqlite", "checkpoint_root": f"{d}/ck"},
        "auth": {"bootstrap_key_env": None},
    })
    app = create_app(cfg, {BASE: [ModelWorker(worker_config(cfg.models[0]))]})
    app.state.service.add_bootstrap_key(KEY, "loss-sdk")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="loss-sdk-server")
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    client = tinker.ServiceClient(base_url=f"http://127.0.0.1:{port}", api_key=KEY)
    yield client
    client.close("success").result()
    server.should_exit = True
    thread.join(timeout=10)


def _datum(q: float = -1.0) -> tt.Datum:
    ids = [72, 101, 108, 108, 111, 33, 10]
    n = len(ids) - 1
    return tt.Datum(model_input=tt.ModelInput.from_ints(ids[:-1]),
                    loss_fn_inputs={"target_tokens": ids[1:], "logprobs": [q] * n, "advantages": [1.0] * n})


def test_sdk_sees_defaults_refusals_and_skipped_steps(service_client) -> None:
    tc = service_client.create_lora_training_client(base_model=BASE, rank=4, seed=1).result()
    data = [_datum()]

    def loss(fn: str, cfg: dict | None) -> float:
        return tc.forward(data, fn, cfg).result().metrics["loss:sum"]

    # Item 16: cispo without a config is Tinker's documented 0.0/4.0, not ppo's 0.8/1.2.
    assert loss("cispo", None) == pytest.approx(loss("cispo", {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}))
    assert loss("cispo", None) != pytest.approx(loss("cispo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}))

    # Item 3: a non-finite dro beta or learning rate is a 400 the SDK raises at once (not retried).
    for beta in ("nan", "Infinity", float("inf")):
        with pytest.raises(tinker.BadRequestError) as e:
            tc.forward_backward(data, "dro", {"beta": beta}).result()
        assert "beta" in str(e.value)
    with pytest.raises(tinker.BadRequestError) as e:
        tc.optim_step(tt.AdamParams(learning_rate=float("inf"))).result()
    assert "learning_rate" in str(e.value)

    # A finite input whose loss overflows: the pass is refused, nothing is applied, the run goes on.
    with pytest.raises(tinker.RequestFailedError) as e:
        tc.forward_backward([_datum(q=-3e38)], "importance_sampling").result()
    assert "non-finite" in str(e.value)
    before = loss("importance_sampling", None)
    tc.forward_backward(data, "importance_sampling").result()
    tc.optim_step(tt.AdamParams(learning_rate=1e-2)).result()
    assert loss("importance_sampling", None) < before  # a positive advantage everywhere: the loss falls
