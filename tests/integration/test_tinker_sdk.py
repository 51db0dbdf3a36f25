"""The real, unmodified tinker 0.38 SDK against a real Twinkle server (builtin://tiny, transformers backend).

Uses the shared ``twinkle_server`` fixture when ``tests/integration/conftest.py`` provides one
(``(base_url, api_key)``); otherwise starts the same gateway app in process on a free loopback port.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from _tinker_server import BASE_MODEL, server_for  # noqa: E402
from tinker import types as tt  # noqa: E402
from tinker.proto.request_conv import forward_backward_request_to_proto  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def srv(request):
    return server_for(request)


@pytest.fixture
def sc(srv):
    """A fresh SDK session per test; closing it unloads the test's adapters (per-user adapter limits)."""
    url, key = srv
    client = tinker.ServiceClient(base_url=url, api_key=key)
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def tok(srv):
    url, key = srv
    client = tinker.ServiceClient(base_url=url, api_key=key)
    tokenizer = client.create_lora_training_client(base_model=BASE_MODEL, rank=4).result().get_tokenizer()
    client.close("success").result()
    return tokenizer


def _sft_datum(ids: list[int]) -> tt.Datum:
    return tt.Datum(model_input=tt.ModelInput.from_ints(ids[:-1]),
                    loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})


def _rl_datum(ids: list[int], old_lp: list[float], adv: float) -> tt.Datum:
    n = len(ids) - 1
    return tt.Datum(model_input=tt.ModelInput.from_ints(ids[:-1]),
                    loss_fn_inputs={"target_tokens": ids[1:], "logprobs": old_lp, "advantages": [adv] * n})


def _lps(out) -> list[np.ndarray]:
    return [np.asarray(o["logprobs"].tolist(), dtype=np.float64) for o in out.loss_fn_outputs]


def test_every_loss_trains_and_metrics_are_tinker_shaped(sc, tok):
    tc = sc.create_lora_training_client(base_model=BASE_MODEL, rank=8, seed=1).result()
    ids = tok.encode("The quick brown fox jumps over the lazy dog.")
    batch = [_sft_datum(ids)]
    losses = []
    for _ in range(6):
        fb = tc.forward_backward(batch, "cross_entropy")
        tc.optim_step(tt.AdamParams(learning_rate=2e-2))
        losses.append(fb.result().metrics["loss:sum"])
    assert losses[-1] < 0.7 * losses[0], losses

    for loss_fn, cfg in [("importance_sampling", None), ("ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
                         ("cispo", {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}), ("dro", {"beta": 0.1})]:
        rc = sc.create_lora_training_client(base_model=BASE_MODEL, rank=8, seed=1).result()
        base_lp = _lps(rc.forward(batch, "cross_entropy").result())[0]
        out = rc.forward_backward([_rl_datum(ids, base_lp.tolist(), 1.0)], loss_fn, cfg).result()
        assert all(k.count(":") == 1 for k in out.metrics), out.metrics
        assert "loss:sum" in out.metrics and len(out.loss_fn_outputs[0]["logprobs"].tolist()) == len(ids) - 1
        np.testing.assert_allclose(_lps(out)[0], base_lp, rtol=1e-4, atol=1e-5)
        rc.optim_step(tt.AdamParams(learning_rate=1e-3)).result()
        # a positive advantage on every token raises the sequence's likelihood
        after = _lps(rc.forward(batch, "cross_entropy").result())[0]
        assert after.sum() > base_lp.sum(), loss_fn


def test_forward_equals_forward_backward_and_custom_loss(sc, tok):
    tc = sc.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=2).result()
    batch = [_sft_datum(tok.encode("hello there, general")), _sft_datum(tok.encode("one two three four five"))]
    fwd = tc.forward(batch, "cross_entropy").result()
    fb = tc.forward_backward(batch, "cross_entropy").result()
    for a, b in zip(_lps(fwd), _lps(fb), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    tc.optim_step(tt.AdamParams(learning_rate=0.0)).result()

    import torch

    def neg_mean_lp(data, logprobs_list):
        loss = -sum(lp.sum() for lp in logprobs_list) / len(logprobs_list)
        return loss, {"custom:mean": float(loss.detach())}

    before = _lps(tc.forward(batch, "cross_entropy").result())
    out = tc.forward_backward_custom(batch, neg_mean_lp).result()
    assert "custom:mean" in out.metrics
    tc.optim_step(tt.AdamParams(learning_rate=2e-2)).result()
    after = _lps(tc.forward(batch, "cross_entropy").result())
    assert sum(a.sum() for a in after) > sum(b.sum() for b in before)
    del torch


def test_save_state_resume_with_optimizer_is_identical(sc, tok):
    tc = sc.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=3).result()
    batch = [_sft_datum(tok.encode("Resume me exactly where I stopped."))]
    for _ in range(2):
        tc.forward_backward(batch, "cross_entropy")
        tc.optim_step(tt.AdamParams(learning_rate=1e-2)).result()
    path = tc.save_state("resume-1").result().path
    assert path.startswith("tinker://") and path.endswith("/weights/resume-1")
    tc2 = sc.create_training_client_from_state_with_optimizer(path).result()
    assert tc2.model_id != tc.model_id
    a = _lps(tc.forward(batch, "cross_entropy").result())[0]
    b = _lps(tc2.forward(batch, "cross_entropy").result())[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the optimizer state came along: one more identical step stays identical
    for c in (tc, tc2):
        c.forward_backward(batch, "cross_entropy")
        c.optim_step(tt.AdamParams(learning_rate=1e-2)).result()
    a = _lps(tc.forward(batch, "cross_entropy").result())[0]
    b = _lps(tc2.forward(batch, "cross_entropy").result())[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_sampling_greedy_seeded_stop_and_logprobs(sc, tok):
    tc = sc.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=4).result()
    prompt_ids = tok.encode("Once upon a time")
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = tt.ModelInput.from_ints(prompt_ids)
    g1 = sampler.sample(prompt, 1, tt.SamplingParams(max_tokens=8, temperature=0.0)).result()
    g2 = sampler.sample(prompt, 1, tt.SamplingParams(max_tokens=8, temperature=0.0)).result()
    assert g1.sequences[0].tokens == g2.sequences[0].tokens
    s = g1.sequences[0]
    assert s.logprobs is not None and len(s.logprobs) == len(s.tokens) and s.sequence_id
    r1 = sampler.sample(prompt, 2, tt.SamplingParams(max_tokens=8, temperature=1.0, seed=7)).result()
    r2 = sampler.sample(prompt, 2, tt.SamplingParams(max_tokens=8, temperature=1.0, seed=7)).result()
    assert [q.tokens for q in r1.sequences] == [q.tokens for q in r2.sequences]
    assert len({q.sequence_id for q in r1.sequences}) == 2
    # stop on the greedy continuation's 3rd token: included at the end, reason "stop"
    stop_tok = s.tokens[2]
    st = sampler.sample(prompt, 1, tt.SamplingParams(max_tokens=8, temperature=0.0, stop=[stop_tok])).result()
    first = s.tokens.index(stop_tok)
    assert st.sequences[0].stop_reason == "stop" and st.sequences[0].tokens == s.tokens[: first + 1]
    ln = sampler.sample(prompt, 1, tt.SamplingParams(max_tokens=2, temperature=0.0, stop=[])).result()
    assert ln.sequences[0].stop_reason == "length" and len(ln.sequences[0].tokens) == 2
    # compute_logprobs matches the training client's forward pass
    full = prompt_ids + s.tokens[:3]
    lps = sampler.compute_logprobs(tt.ModelInput.from_ints(full)).result()
    assert lps[0] is None
    fwd = _lps(tc.forward([_sft_datum(full)], "cross_entropy").result())[0]
    np.testing.assert_allclose(np.asarray(lps[1:]), fwd, rtol=1e-3, atol=1e-3)
    last = sampler.sample(tt.ModelInput.from_ints(full), 1, tt.SamplingParams(max_tokens=1),
                          include_prompt_logprobs=True, prompt_logprobs_last_n=2).result()
    assert all(v is None for v in last.prompt_logprobs[:-2]) and None not in last.prompt_logprobs[-2:]


def test_rest_client_lists_runs_and_checkpoints_and_deletes(sc, srv, tok):
    url, key = srv
    tc = sc.create_lora_training_client(base_model=BASE_MODEL, rank=4, user_metadata={"renderer_name": "x"}).result()
    tc.save_state("keep").result()
    tc.save_weights_for_sampler("drop").result()
    rest = tinker.RestClient(base_url=url, api_key=key)
    run = rest.get_training_run(tc.model_id).result()
    assert run.base_model == BASE_MODEL and run.lora_rank == 4 and run.user_metadata == {"renderer_name": "x"}
    assert tc.model_id in {r.training_run_id for r in rest.list_training_runs(limit=100).result().training_runs}
    ids = {c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert {"weights/keep", "sampler_weights/drop"} <= ids
    rest.delete_checkpoint(tc.model_id, "sampler_weights/drop").result()
    ids = {c.checkpoint_id for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert "sampler_weights/drop" not in ids and "weights/keep" in ids
    info = rest.get_weights_info_by_tinker_path(f"tinker://{tc.model_id}/weights/keep").result()
    assert info.base_model == BASE_MODEL and info.lora_rank == 4


def test_two_training_clients_concurrently(sc, tok):
    texts = ["alpha beta gamma delta epsilon", "red orange yellow green blue"]
    results: dict[int, list[float]] = {}

    def train(i: int) -> None:
        tc = sc.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=10 + i).result()
        batch = [_sft_datum(tok.encode(texts[i]))]
        losses = []
        for _ in range(5):
            fb = tc.forward_backward(batch, "cross_entropy")
            tc.optim_step(tt.AdamParams(learning_rate=2e-2))
            losses.append(fb.result().metrics["loss:sum"])
        results[i] = losses

    threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert set(results) == {0, 1}
    for losses in results.values():
        assert losses[-1] < losses[0]


def test_async_variants(sc, tok):
    async def main():
        tc = await sc.create_lora_training_client(base_model=BASE_MODEL, rank=4)
        batch = [_sft_datum(tok.encode("async all the way down"))]
        fb_f = tc.forward_backward(batch, "cross_entropy")
        op_f = tc.optim_step(tt.AdamParams(learning_rate=1e-2))
        fb, _ = await fb_f, await op_f
        sampler = await tc.save_weights_and_get_sampling_client()
        res = await sampler.sample(tt.ModelInput.from_ints(tok.encode("async")), 1, tt.SamplingParams(max_tokens=3))
        return fb, res

    fb, res = asyncio.run(main())
    assert "loss:sum" in fb.metrics and len(res.sequences) == 1


def test_bad_input_fails_fast_and_server_keeps_serving(sc, tok):
    ids = tok.encode("bad input test")
    cases = [
        ([_sft_datum(ids)], "no_such_loss"),
        ([_sft_datum(ids[:-1] + [10 ** 7])], "cross_entropy"),
        ([_sft_datum(ids)], "ppo"),  # ppo needs logprobs + advantages
    ]
    for data, loss_fn in cases:
        tc = sc.create_lora_training_client(base_model=BASE_MODEL, rank=4).result()
        t0 = time.time()
        with pytest.raises(Exception) as e:
            tc.forward_backward(data, loss_fn).result(timeout=60)
        assert time.time() - t0 < 15, (loss_fn, time.time() - t0)
        assert str(e.value)
    tc = sc.create_lora_training_client(base_model=BASE_MODEL, rank=4).result()
    assert tc.forward([_sft_datum(ids)], "cross_entropy").result().loss_fn_outputs


def test_replayed_seq_id_never_applies_a_gradient_twice(srv, tok):
    url, key = srv
    h = {"X-API-Key": key}
    ids = tok.encode("replay safety")
    d = _sft_datum(ids)

    with httpx.Client(base_url=url + "/api/v1", headers=h, timeout=60) as c:
        def wait(rid):
            while True:
                r = c.post("/retrieve_future", json={"request_id": rid},
                           headers={"Accept": "application/x-protobuf"})
                assert r.status_code == 200, r.text
                if r.headers["content-type"].startswith("application/x-protobuf"):
                    return r.content
                body = r.json()
                if body.get("type") != "try_again":
                    assert "error" not in body, body
                    return body

        sid = c.post("/create_session", json={"tags": [], "sdk_version": "0.38.0"}).json()["session_id"]

        def new_model(n):
            r = c.post("/create_model", json={"session_id": sid, "model_seq_id": n, "base_model": BASE_MODEL,
                                              "lora_config": {"rank": 4, "seed": 42}})
            return wait(r.json()["request_id"])["model_id"]

        def fb_body(mid, seq, forward_only=False):
            req = tt.ForwardBackwardRequest(forward_backward_input=tt.ForwardBackwardInput(data=[d], loss_fn="cross_entropy"),
                                            model_id=mid, seq_id=seq)
            msg = forward_backward_request_to_proto(req)
            msg.forward_only = forward_only
            return msg.SerializeToString()

        def post_fb(mid, seq, forward_only=False):
            r = c.post("/forward_backward", content=fb_body(mid, seq, forward_only),
                       headers={"Content-Type": "application/x-protobuf"})
            assert r.status_code == 200, r.text
            return r.json()["request_id"]

        def logprobs(mid, seq):
            from tinker.proto.response_conv import deserialize_forward_backward_output

            return np.asarray(deserialize_forward_backward_output(wait(post_fb(mid, seq, True))).loss_fn_outputs[0]["logprobs"].tolist())

        def optim(mid, seq):
            r = c.post("/optim_step", json={"model_id": mid, "seq_id": seq, "adam_params": {"learning_rate": 0.05}})
            wait(r.json()["request_id"])

        once, replayed, twice = new_model(0), new_model(1), new_model(2)
        start = logprobs(once, 1)
        np.testing.assert_allclose(logprobs(replayed, 1), start, atol=1e-6)  # same seed: same start
        logprobs(twice, 1)
        for mid in (once, replayed, twice):  # one ordinary step first (Adam's first step is scale-free)
            wait(post_fb(mid, 2))
            optim(mid, 3)
        wait(post_fb(once, 4))
        optim(once, 5)
        r1, r2 = post_fb(replayed, 4), post_fb(replayed, 4)  # an SDK retry: same seq_id
        wait(r1)
        wait(r2)
        optim(replayed, 5)
        wait(post_fb(twice, 4))
        wait(post_fb(twice, 5))  # a genuine second application (new seq_id)
        optim(twice, 6)
        a, b, t = logprobs(once, 6), logprobs(replayed, 6), logprobs(twice, 7)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert not np.allclose(a, t, atol=1e-4)  # the check would see a doubled gradient
        assert c.post(f"/sessions/{sid}/finish", json={"reason": {"type": "success"}}).status_code == 200
