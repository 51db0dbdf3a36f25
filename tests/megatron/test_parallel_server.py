"""A real server (Ray Serve) whose megatron replica spans two ranks, in the layout of the Qwen3-4B cookbook config (tensor_parallel_size 2 over gloo, the second
rank a Ray actor started by the replica), trained through ``twinkle_client``."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration
pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def tp2_server():
    from tests.integration.conftest import own_server
    from tests.megatron.test_config_4b import scaled_down_4b

    # the parallel layout of cookbook/client/server/megatron/server_config_4b.yaml (TP 2), on builtin://tiny
    cfg = scaled_down_4b("tiny-tp2")
    assert cfg["models"][0]["megatron"]["tensor_parallel_size"] == 2
    with own_server(cfg, "twinkle-mgtp-") as handle:
        yield handle


def test_native_client_trains_on_a_two_rank_replica(tp2_server):
    from tests.integration.conftest import native_lora_losses
    from twinkle_client import connect
    from twinkle_client.model import MegatronModel

    with connect(tp2_server.url, api_key=tp2_server.api_key) as session:
        model = MegatronModel(model_id="tiny-tp2", session=session)
        losses = native_lora_losses(model, "tp", 5)
        assert losses[-1] < 0.7 * losses[0], losses
        path = model.save("tp-final")
        assert path.endswith("/weights/tp-final")
    ckpts = list((tp2_server.workdir / "checkpoints").rglob("adapter_model.safetensors"))
    assert ckpts, "rank 0 wrote the gathered adapter"
    from safetensors.torch import load_file

    w = load_file(str(ckpts[0]))
    # full (TP-1) shapes: builtin://tiny has 4 heads × 32 = 128 q rows and an FFN of 384
    assert w["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape[0] == 128
    assert w["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape[1] == 384
