"""The shipped megatron server config launches on CPU, and both clients train through it.

Starts its own server from ``cookbook/client/server/megatron/server_config.yaml`` (port and storage paths moved
to a temp dir, nothing else changed), then trains with the unmodified Tinker SDK and with ``twinkle_client``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration
pytest.importorskip("megatron.core")
tinker = pytest.importorskip("tinker")

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "cookbook/client/server/megatron/server_config.yaml"


@pytest.fixture(scope="module")
def megatron_server():
    from tests.integration.conftest import own_server

    cfg = yaml.safe_load(CONFIG.read_text())
    assert [m["backend"] for m in cfg["models"]] == ["megatron"]
    for m in cfg["models"]:
        m.setdefault("ray_actor_options", {})["num_cpus"] = 0  # share the 2 CI cores with the other server
    with own_server(cfg, "twinkle-mg-") as handle:
        yield handle, cfg["models"][0].get("name") or cfg["models"][0]["model_id"]


def test_tinker_sdk_trains_on_megatron(megatron_server):
    from tinker import types as tt

    srv, base_model = megatron_server
    sc = tinker.ServiceClient(base_url=srv.url, api_key=srv.api_key)
    try:
        tc = sc.create_lora_training_client(base_model=base_model, rank=8, seed=0).result()
        tok = tc.get_tokenizer()
        ids = tok.encode("Megatron trains adapters too, one step at a time.")
        datum = tt.Datum(model_input=tt.ModelInput.from_ints(ids[:-1]),
                         loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
        losses = []
        for _ in range(6):
            fb = tc.forward_backward([datum], "cross_entropy")
            tc.optim_step(tt.AdamParams(learning_rate=2e-2))
            losses.append(fb.result().metrics["loss:sum"])
        assert losses[-1] < 0.7 * losses[0], losses
        sampler = tc.save_weights_and_get_sampling_client().result()
        out = sampler.sample(tt.ModelInput.from_ints(ids[:5]), 1,
                             tt.SamplingParams(max_tokens=4, temperature=0.0)).result()
        assert len(out.sequences[0].tokens) >= 1
    finally:
        sc.close("success").result()


def test_native_client_trains_on_megatron(megatron_server):
    from tests.integration.conftest import native_lora_losses
    from twinkle_client import connect
    from twinkle_client.model import MegatronModel

    srv, base_model = megatron_server
    with connect(srv.url, api_key=srv.api_key) as session:
        model = MegatronModel(model_id=base_model, session=session)
        losses = native_lora_losses(model, "mg", 6)
        assert losses[-1] < 0.7 * losses[0], losses
        path = model.save("mg-final")
        assert path.startswith("tinker://") and path.endswith("/weights/mg-final")
        assert session.get_run(model.run_id).base_model == base_model
