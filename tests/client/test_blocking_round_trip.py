"""Blocking calls of ``twinkle_client`` take one HTTP round trip (submit with ``?wait=``); ``*_async`` calls do
not wait on the submit, so they still pipeline."""

from __future__ import annotations

import pytest
from inprocess_server import InProcessServer

import twinkle_client
from twinkle_client.model import MockModel
from twinkle_client.sampler import Sampler

URL = "http://twinkle.test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = InProcessServer(tmp_path_factory.mktemp("srv"))
    yield srv
    srv.close()


def test_blocking_calls_are_one_round_trip_async_calls_do_not_wait(server):
    seen: list[tuple[str, str, str]] = []

    def spy(request, send):
        seen.append((request.method, request.url.path.split("/api/v1/twinkle/")[-1], request.url.params.get("wait", "")))
        return send(request)

    sess = twinkle_client.connect(URL, "key-alice", transport=server.wrap(spy), heartbeat=False)
    try:
        model = MockModel()
        model.add_adapter_to_model("a", {"rank": 4})
        seen.clear()
        out = model.forward_backward(inputs=[{"input_ids": [5, 6, 7, 8]}])
        assert out.loss_fn_outputs
        step = model.clip_grad_and_step()
        assert step["step"] == 1
        assert [(m, p.rsplit("/", 1)[-1], bool(w)) for m, p, w in seen] == [
            ("POST", "forward_backward", True), ("POST", "optim_step", True)]
        assert not any(p.startswith("futures/") for _, p, _ in seen)

        seen.clear()
        fut = model.forward_backward_async(inputs=[{"input_ids": [5, 6, 7, 8]}])
        assert seen == [("POST", seen[0][1], "")]  # submitted without waiting
        assert fut.result().loss_fn_outputs
        assert seen[-1][1].startswith("futures/")  # the result came from the long-poll

        seen.clear()
        resp = Sampler(model=model).sample([5, 6, 7], {"max_tokens": 3})
        assert resp.sequences and seen == [("POST", "sample", seen[0][2])] and seen[0][2]
    finally:
        sess.close()
