"""Issue 12, item 15 follow-up (back-pressure): a forward_backward the SDK splits into chunks, with the real SDK.

* guess_number's training batch (256 datums x 441 tokens = 112 896 tokens, importance_sampling inputs at 24
  estimated bytes a token) is 7 chunks under the shipped config's advertised limits: well under the worker's
  ``max_pending_per_adapter`` (64), and it trains;
* a batch split into more chunks than ``max_pending_per_adapter`` trains: the gateway admits a run's ops at
  submit (``gateway.training.Training._admit``), so the surplus chunks get an HTTP 429 + Retry-After that the SDK retries, not a
  failed future from the worker's queue (which it never retries: "too many requests queued for this adapter").
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]
tinker = pytest.importorskip("tinker")

from _shipped_server import TRANSFORMER_CONFIG, shipped_server  # noqa: E402


def _rl_datum(rng, n: int):
    toks = rng.integers(5, 200, size=n + 1)
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(toks[:-1].tolist()),
        loss_fn_inputs={"target_tokens": toks[1:].astype(np.int64),
                        "logprobs": np.full(n, -1.0, dtype=np.float32),
                        "advantages": rng.normal(size=n).astype(np.float32),
                        "mask": np.ones(n, dtype=np.float32)},
    )


def _train(srv, data) -> int:
    sc = tinker.ServiceClient(base_url=srv.url, api_key=srv.api_key)
    tc = sc.create_lora_training_client(base_model=srv.base_model, rank=8).result()
    n_chunks = len(list(tc._chunked_requests_generator(data)))
    out = tc.forward_backward(data, "importance_sampling").result()
    assert len(out.loss_fn_outputs) == len(data)
    tc.optim_step(tinker.AdamParams(learning_rate=1e-4)).result()
    sc.close("success").result()
    return n_chunks


def test_guess_number_shaped_batch_trains():
    rng = np.random.default_rng(0)
    data = [_rl_datum(rng, 441) for _ in range(256)]
    with shipped_server() as srv:
        limit = srv.config.models[0].scheduler.max_pending_per_adapter
        n_chunks = _train(srv, data)
    assert n_chunks * 4 <= limit, (n_chunks, limit)


def test_more_chunks_than_the_per_adapter_queue_still_trains():
    raw = yaml.safe_load(TRANSFORMER_CONFIG.read_text())
    model = raw["models"][0]
    model["max_tokens_per_request"] = 1024  # 12 288 advertised bytes a chunk: 5 datums of 100 tokens
    model["scheduler"] = {**model.get("scheduler", {}), "max_pending_per_adapter": 4}
    rng = np.random.default_rng(0)
    data = [_rl_datum(rng, 100) for _ in range(40)]  # 8 chunks > 4
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "server_config.yaml"
        path.write_text(yaml.safe_dump(raw))
        with shipped_server(path) as srv:
            assert _train(srv, data) == 8
