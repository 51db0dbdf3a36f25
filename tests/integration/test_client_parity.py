"""twinkle_client against the REAL server (Ray Serve, ``builtin://tiny`` on the transformers backend).

* import-swap parity: the same training script with ``twinkle.model`` (local) and ``twinkle_client.model``
  (remote) gives the same loss curve (same seeds, 1e-5);
* a forward_backward whose reply is lost and is retried with the same ``seq_id`` is applied once: the next
  optimizer step is the same as without the retry.
"""

from __future__ import annotations

import httpx
import pytest

import twinkle_client
from twinkle.data import ChatEncoder, DataLoader, self_cognition_dataset
from twinkle.types import LoraConfig

pytestmark = pytest.mark.integration

MODEL = "builtin://tiny"
STEPS = 5


def _batches(tokenizer):
    data = self_cognition_dataset("Twinkle", "the Twinkle team").map(ChatEncoder(tokenizer, max_length=96))
    return DataLoader(data, batch_size=4, shuffle=True, seed=0).cycle()


def _script(Model, **kw) -> list[float]:
    """The user's training script: identical for twinkle.model and twinkle_client.model."""
    model = Model(MODEL, seed=0, **kw)  # the server hosts its base model with seed 0 (ModelConfig.seed)
    model.add_adapter_to_model("parity", LoraConfig(rank=8, alpha=16, seed=0))
    model.set_optimizer("AdamW", lr=3e-3, grad_clip_norm=1.0)
    model.set_lr_scheduler("cosine", num_warmup_steps=2, num_training_steps=STEPS)
    batches = _batches(model.get_tokenizer())
    losses = []
    for _ in range(STEPS):
        model.forward_backward(inputs=next(batches))
        model.clip_grad_and_step()
        losses.append(model.calculate_metric()["loss"])
    return losses


def test_import_swap_parity_local_vs_remote_transformers(twinkle_server, tmp_path, monkeypatch):
    import torch

    torch.set_num_threads(1)
    from twinkle.model import TransformersModel as LocalModel
    from twinkle_client.model import TransformersModel as RemoteModel

    local = _script(LocalModel, output_dir=str(tmp_path / "local"))
    monkeypatch.setenv("TWINKLE_HOME", str(tmp_path / "home"))
    with twinkle_client.init_twinkle_client(twinkle_server.url, twinkle_server.api_key):
        remote = _script(RemoteModel)
    assert remote == pytest.approx(local, abs=1e-5)
    assert remote[-1] < remote[0]


class _DropFirstReply(httpx.BaseTransport):
    """A real HTTP transport that loses the reply of the first forward_backward (the server did the work)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.dropped: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = self.inner.handle_request(request)
        if request.url.path.endswith("/forward_backward") and not self.dropped:
            resp.read()
            resp.close()
            self.dropped.append(request.content.decode()[:80])
            raise httpx.ReadError("reply lost", request=request)
        return resp

    def close(self) -> None:
        self.inner.close()


def test_retried_forward_backward_does_not_change_next_step(twinkle_server, tmp_path, monkeypatch):
    from twinkle_client.model import TransformersModel

    monkeypatch.setenv("TWINKLE_HOME", str(tmp_path / "home"))
    url, key = twinkle_server.url, twinkle_server.api_key
    control_sess = twinkle_client.connect(url, key, make_current=False)
    flaky_transport = _DropFirstReply()
    flaky_sess = twinkle_client.connect(url, key, transport=flaky_transport, make_current=False)
    models = []
    for name, sess in (("control", control_sess), ("flaky", flaky_sess)):
        m = TransformersModel(MODEL, seed=0, session=sess)
        m.add_adapter_to_model(name, LoraConfig(rank=8, alpha=16, seed=0))
        m.set_optimizer("AdamW", lr=3e-3)
        models.append(m)
    batches = _batches(models[0].get_tokenizer())
    first, second = next(batches), next(batches)
    losses = []
    for m in models:
        out = m.forward_backward(inputs=first)  # the flaky client sends this twice, with the same seq_id
        m.clip_grad_and_step()
        nxt = m.forward_backward(inputs=second)
        losses.append((out.metrics["loss:sum"], nxt.metrics["loss:sum"], m.run_info().step))
    assert flaky_transport.dropped, "the reply was never dropped"
    (c_first, c_next, c_step), (f_first, f_next, f_step) = losses
    assert f_first == pytest.approx(c_first, rel=1e-5)  # the retry is answered from the first execution
    assert f_next == pytest.approx(c_next, rel=1e-5)  # ... and the gradients were applied once
    assert c_step == f_step == 1
    # the worker's queue/execution split crosses the Ray hop with the result (FutureState.timing)
    fb = [t for t in control_sess.latency if t["kind"] == "forward_backward"]
    assert fb and all(t["exec_s"] is not None and t["exec_s"] > 0 and t["queue_s"] is not None for t in fb)
    assert all(t["queue_s"] + t["exec_s"] <= t["server_s"] + 1e-3 for t in fb)
    control_sess.close()
    flaky_sess.close()
