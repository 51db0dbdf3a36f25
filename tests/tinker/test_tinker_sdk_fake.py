"""The real, unpatched tinker 0.38 SDK against the Tinker routes on a socket: the real gateway app on a
mock-backend worker in process (no Ray)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

tinker = pytest.importorskip("tinker")
from tinker import types as tt  # noqa: E402


def _datum(tokens):
    return tt.Datum(
        model_input=tt.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


@pytest.fixture(scope="module")
def service_client(live_server):
    url, _ = live_server
    sc = tinker.ServiceClient(base_url=url, api_key="tml-test")
    yield sc
    sc.close("success").result()
    _, service = live_server
    assert all(s.state == "closed" for s in service.sessions.by_id.values() if s.client == "tinker")


def test_sdk_train_save_resume_sample(service_client, live_server):
    _, service = live_server
    tc = service_client.create_lora_training_client(base_model="fake/base", rank=4, train_unembed=False)
    tc = tc.result() if hasattr(tc, "result") else tc
    assert service.runs.by_id[tc.model_id].lora.train_unembed is False
    batch = [_datum([1, 2, 3, 4]), _datum([5, 6, 7])]
    t0 = time.time()
    losses = []
    for _ in range(3):
        fb = tc.forward_backward(batch, "cross_entropy")
        tc.optim_step(tt.AdamParams(learning_rate=0.1)).result()
        losses.append(fb.result().metrics["loss:sum"])
    assert losses[0] > losses[1] > losses[2]
    fwd = tc.forward(batch, "cross_entropy").result()
    fb = tc.forward_backward(batch, "cross_entropy").result()
    assert [o["logprobs"].tolist() for o in fwd.loss_fn_outputs] == [o["logprobs"].tolist() for o in fb.loss_fn_outputs]
    tc.optim_step(tt.AdamParams(learning_rate=0.0)).result()

    path = tc.save_state("ck1").result().path
    assert path == f"tinker://{tc.model_id}/weights/ck1"
    tc2 = service_client.create_training_client_from_state_with_optimizer(path).result()
    fwd2 = tc2.forward(batch, "cross_entropy").result()
    assert [o["logprobs"].tolist() for o in fwd2.loss_fn_outputs] == [o["logprobs"].tolist() for o in fwd.loss_fn_outputs]

    sampler = tc.save_weights_and_get_sampling_client().result()
    res = sampler.sample(tt.ModelInput.from_ints([1, 2]), 2, tt.SamplingParams(max_tokens=3, temperature=0.0)).result()
    assert len(res.sequences) == 2 and all(s.sequence_id for s in res.sequences)
    assert len(res.sequences[0].tokens) == 3 and res.sequences[0].stop_reason == "length"
    lps = sampler.compute_logprobs(tt.ModelInput.from_ints([1, 2, 3])).result()
    assert lps[0] is None and len(lps) == 3

    named = tc.save_weights_for_sampler("pub").result().path
    s2 = service_client.create_sampling_client(model_path=named).result()
    assert s2.get_base_model() == "fake/base"

    rest = tinker.RestClient(base_url=live_server[0], api_key="tml-test")
    ids = {r.training_run_id for r in rest.list_training_runs().result().training_runs}
    assert {tc.model_id, tc2.model_id} <= ids
    cks = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert "weights/ck1" in {c.checkpoint_id for c in cks}
    rest.delete_checkpoint(tc.model_id, "sampler_weights/pub").result()
    assert "sampler_weights/pub" not in {c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert time.time() - t0 < 60


def test_sdk_bad_input_fails_fast_and_server_keeps_serving(service_client):
    tc = service_client.create_lora_training_client(base_model="fake/base", rank=4).result()
    t0 = time.time()
    with pytest.raises(Exception) as e:
        tc.forward_backward([_datum([1, 2, 3])], "bogus_loss").result()
    assert "loss_fn" in str(e.value) or "bogus" in str(e.value)
    assert time.time() - t0 < 10
    tc2 = service_client.create_lora_training_client(base_model="fake/base", rank=4).result()
    assert tc2.forward([_datum([1, 2, 3])], "cross_entropy").result().loss_fn_outputs


def test_sdk_async_variants(service_client):
    async def main():
        tc = await service_client.create_lora_training_client(base_model="fake/base", rank=4)
        fb = await tc.forward_backward([_datum([1, 2, 3])], "cross_entropy")
        opt = await tc.optim_step(tt.AdamParams(learning_rate=0.1))
        return fb, opt

    fb, opt = asyncio.run(main())
    assert "loss:sum" in fb.metrics and opt is not None


@pytest.mark.slow
def test_init_tinker_client_lifts_only_the_prefix_check(live_server):
    url, _ = live_server
    code = f"""
import twinkle_client, sys
assert "torch" not in sys.modules
from twinkle_client import init_tinker_client
cfg = init_tinker_client(base_url={url!r} + "/", api_key="plain-key")
import os, tinker
assert os.environ["TINKER_BASE_URL"] == {url!r} and os.environ["TINKER_API_KEY"] == "plain-key"
sc = tinker.ServiceClient()
caps = sc.get_server_capabilities()
print("OK", caps.supported_models[0].model_name, flush=True)
os._exit(0)  # skip finalization: the SDK's daemon event-loop thread once aborted it (SIGABRT, CI of session 9)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINKER_", "TWINKLE_"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OK fake/base" in out.stdout
    # without the patch, the SDK refuses the same key client-side
    code2 = f"import tinker\ntinker.ServiceClient(base_url={url!r}, api_key='plain-key').get_server_capabilities()"
    out2 = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True, env=env, timeout=60)
    assert out2.returncode != 0 and "tml-" in out2.stderr
