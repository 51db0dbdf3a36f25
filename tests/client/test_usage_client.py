"""``Session.usage()`` against the real in-process gateway: your own metered tokens as a DataFrame; another
user's usage is refused."""

from __future__ import annotations

import pytest
from inprocess_server import InProcessServer

import twinkle_client
from twinkle.types import TwinkleError
from twinkle_client.model import MockModel

URL = "http://twinkle.test"
# 20 + 12 tokens; the model sees 19 + 11 input tokens (each row predicts its next token)
BATCH = [{"input_ids": list(range(5, 25))}, {"input_ids": list(range(30, 42))}]
PER_STEP = 30


@pytest.mark.slow
def test_usage_frame_is_your_own(tmp_path):
    pd = pytest.importorskip("pandas")
    srv = InProcessServer(tmp_path)
    try:
        key = srv.service.store.create_key("carol")[1]  # not an admin (the bootstrap keys are)
        sess = twinkle_client.connect(URL, key, transport=srv.transport, heartbeat=False)
        model = MockModel(seed=0)
        model.add_adapter_to_model("default", {"rank": 4})
        model.set_optimizer("AdamW", lr=1e-2)
        for _ in range(3):
            model.forward_backward(inputs=BATCH)
            model.clip_grad_and_step()
        frame = sess.usage()
        assert isinstance(frame, pd.DataFrame)
        assert list(frame["user"]) == ["carol"]
        assert int(frame["tokens_trained"].iloc[0]) == 3 * PER_STEP
        assert sess.usage_rows(since="1h")[0]["tokens_trained"] == 3 * PER_STEP
        load = sess.server_load()  # what the JupyterLab panel polls
        assert load["usage"][0]["tokens_trained"] == 3 * PER_STEP and load["tokens_per_s"]["trained"] > 0
        assert load["queue_depth"] == 0 and load["replicas"][0]["adapters"] == 1
        with pytest.raises(TwinkleError) as e:
            sess.usage(user="bob")
        assert e.value.status == 403 and "admins only" in str(e.value)
        sess.close()
    finally:
        srv.close()
