"""A real server (Ray Serve) whose megatron replica spans two ranks (tensor_parallel_size 2 over gloo, the second
rank a Ray actor started by the replica), trained through ``twinkle_client``."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration
pytest.importorskip("megatron.core")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tp2_server():
    from tests.integration.conftest import ServerHandle

    workdir = Path(tempfile.mkdtemp(prefix="twinkle-mgtp-"))
    port = _free_port()
    cfg = {
        "http": {"host": "127.0.0.1", "port": port},
        "persistence": {"sqlite_path": str(workdir / "server.db"), "checkpoint_root": str(workdir / "checkpoints")},
        "models": [{"name": "tiny-tp2", "backend": "megatron", "model_id": "builtin://tiny",
                    "ray_actor_options": {"num_cpus": 0}, "max_adapters": 4, "dtype": "float32",
                    "megatron": {"tensor_parallel_size": 2, "rank_num_cpus": 0}}],
    }
    path = workdir / "server_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    handle = ServerHandle(url=f"http://127.0.0.1:{port}", port=port, workdir=workdir, config_path=path,
                          log_path=workdir / "server.log")
    handle.create_key("alice")
    handle.start()
    try:
        yield handle
    finally:
        handle.stop()


def test_native_client_trains_on_a_two_rank_replica(tp2_server):
    from twinkle_client import connect
    from twinkle_client.model import MegatronModel

    with connect(tp2_server.url, api_key=tp2_server.api_key) as session:
        model = MegatronModel(model_id="tiny-tp2", session=session)
        model.add_adapter_to_model("tp", {"rank": 8, "seed": 0})
        model.set_optimizer("AdamW", lr=2e-2)
        batch = [{"input_ids": list(range(10, 40)), "labels": list(range(10, 40))}]
        losses = []
        for _ in range(5):
            out = model.forward_backward(inputs=batch)
            model.clip_grad_and_step()
            losses.append(out.metrics["loss:sum"])
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
