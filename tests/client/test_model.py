"""Remote model + sampler against the real gateway on a mock worker, in-process (``conftest.net``)."""

from __future__ import annotations

import pytest
from inprocess_server import KEY

import twinkle_client
from twinkle.types import (
    AdamParams,
    InvalidInputError,
    LimitExceededError,
    LoraConfig,
    NotFoundError,
    SamplingParams,
)
from twinkle_client.model import MockModel, TransformersModel
from twinkle_client.sampler import Sampler

LR = 0.01  # AdamW on the mock backend's toy model learns steadily at this rate


def _batch(n: int = 2) -> list[dict]:
    return [{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5]} for _ in range(n)]


def _applied(net, run_id: str, kind: str) -> int:
    """How many ``kind`` operations the server applied to the run (its metrics log: one point per operation)."""
    return sum(p["kind"] == kind for p in net.server.get(f"runs/{run_id}/metrics")["points"])


def _eval_loss(model) -> float:
    """The adapter's loss on a fixed batch, without training (the observable of its weights)."""
    model.forward(inputs=_batch(1))
    return model.calculate_metric(is_training=False)["loss"]


def test_training_loop_learns_and_sends_increasing_seq_ids(session, net):
    model = TransformersModel(model_id="mock://tiny", seed=3, session=session)
    run = model.add_adapter_to_model("default", LoraConfig(rank=8))
    held = net.server.get(f"runs/{run.run_id}")
    assert held["lora"]["seed"] == 3  # the model's seed seeds the adapter
    assert held["name"] == "default"
    model.set_optimizer("AdamW", lr=LR)
    losses = []
    for _ in range(5):
        out = model.forward_backward(inputs=_batch())
        assert len(out.loss_fn_outputs) == 2
        step = model.clip_grad_and_step()
        m = model.calculate_metric(is_training=True)
        losses.append(m["loss"])
        assert m["step"] == step["step"] and m["tokens"] == 8  # 4 input tokens per example (as twinkle.model.local counts)
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.5 * losses[0]
    assert step["lr"] == LR and step["step"] == 5 and step["grad_norm"] > 0
    seqs = net.seq_ids(run.run_id)
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) == 10


def test_calculate_metric_matches_server_loss(session, net):
    model = MockModel(session=session)  # no model_id: the first hosted base model
    assert model.model_id == "mock://tiny"
    run = model.add_adapter_to_model("a", {"r": 4, "lora_alpha": 8})
    held = net.server.get(f"runs/{run.run_id}")["lora"]
    assert held["rank"] == 4 and held["alpha"] == 8
    out = model.forward_backward(inputs=_batch(3))
    per_token = out.metrics["loss:sum"] / 9  # 3 examples x 3 weighted tokens
    assert model.calculate_metric()["loss"] == pytest.approx(per_token)
    assert net.server.get(f"runs/{run.run_id}/metrics")["points"][-1]["metrics"]["loss"] == pytest.approx(per_token)
    model.forward(inputs=_batch(1))  # forward does not count toward the training loss
    assert model.calculate_metric()["tokens"] == 0
    model.forward(inputs=_batch(1))
    assert model.calculate_metric(is_training=False)["loss"] == pytest.approx(per_token)  # same weights, same loss


def test_retry_after_lost_reply_is_not_applied_twice(session, net):
    model = TransformersModel(session=session)
    run = model.add_adapter_to_model("default", {"rank": 4})
    model.set_optimizer("SGD", lr=0.1)
    net.drop_next_response = 1  # the server does the work, the reply is lost, the client retries
    model.forward_backward(inputs=_batch())
    assert _applied(net, run.run_id, "forward_backward") == 1
    sent = [b["seq_id"] for (_, r, b) in net.requests if r.endswith("/forward_backward")]
    assert sent == [sent[0], sent[0]]  # the retry carried the same seq_id
    net.drop_next_response = 1  # the same for the step: applied once, the run is at step 1
    assert model.clip_grad_and_step()["step"] == 1
    assert _applied(net, run.run_id, "optim_step") == 1 and session.get_run(run.run_id).step == 1


def test_typed_errors_name_the_field(session):
    with pytest.raises(NotFoundError, match="not hosted") as ei:
        TransformersModel(model_id="Qwen/Qwen3-0.6B", session=session)
    assert ei.value.field == "model_id"
    model = TransformersModel(session=session)
    with pytest.raises(InvalidInputError, match="add_adapter_to_model"):
        model.forward_backward(inputs=_batch())
    with pytest.raises(LimitExceededError, match="exceeds this model.s max_lora_rank 16") as ei:
        model.add_adapter_to_model("big", {"rank": 128})
    assert ei.value.field == "lora.rank" and ei.value.status == 413
    model.add_adapter_to_model("ok", {"rank": 4})
    with pytest.raises(InvalidInputError) as ei:
        model.forward_backward(inputs=[{"input_ids": [1, 2], "labels": [1]}])
    assert ei.value.field == "inputs[0].labels"
    with pytest.raises(NotFoundError) as ei:
        model.forward_backward(inputs=_batch(), adapter_name="nope")
    assert ei.value.field == "adapter_name"
    with pytest.raises(InvalidInputError) as ei:
        model.set_lr_scheduler("exponential")
    assert ei.value.field == "scheduler"


def test_add_adapter_keyword_rank_reaches_the_server(session):
    model = TransformersModel(session=session)
    run = model.add_adapter_to_model("kw", r=8, lora_alpha=16)
    assert (run.lora.rank, run.lora.alpha) == (8, 16)  # what the server created
    assert {r.name: r.lora.rank for r in session.runs(all_sessions=False)}["kw"] == 8


def test_save_load_and_checkpoints(session):
    model = TransformersModel(session=session)
    run = model.add_adapter_to_model("default", {"rank": 4})
    model.set_optimizer("AdamW", lr=LR)
    model.forward_backward(inputs=_batch())
    model.clip_grad_and_step()
    path = model.save("step-1")
    assert path == f"tinker://{run.run_id}/weights/step-1"
    loss_saved = _eval_loss(model)
    model.forward_backward(inputs=_batch())
    model.clip_grad_and_step()
    assert _eval_loss(model) != pytest.approx(loss_saved)
    model.load("step-1")
    assert _eval_loss(model) == pytest.approx(loss_saved)
    assert session.get_run(run.run_id).step == 1
    assert [c.name for c in model.checkpoints()] == ["step-1"]
    assert model.save("final", save_optimizer=False).endswith("/sampler_weights/final")


def test_reattach_continues_seq_ids_and_skips_same_optimizer(net):
    s1 = twinkle_client.connect("http://fake", KEY, transport=net, heartbeat=False)
    m1 = TransformersModel(session=s1)
    run = m1.add_adapter_to_model("default", {"rank": 4})
    m1.set_optimizer("AdamW", lr=LR)
    for _ in range(3):
        m1.forward_backward(inputs=_batch())
        m1.clip_grad_and_step()
    loss_before = _eval_loss(m1)
    last_seq = max(net.seq_ids(run.run_id))
    s1.detach()  # killed: no close
    # a new process: same notebook cells, re-attached session
    s2 = twinkle_client.connect("http://fake", KEY, session_id=s1.session_id, transport=net, heartbeat=False)
    m2 = TransformersModel(session=s2)
    run2 = m2.add_adapter_to_model("default", {"rank": 4})
    assert run2.run_id == run.run_id and run2.step == 3 and len(s2.runs()) == 1
    n_opt = sum(r.endswith("/optimizer") for (_, r, _) in net.requests)
    m2.set_optimizer("AdamW", lr=LR)  # unchanged settings: optimizer state is kept (nothing is sent)
    assert sum(r.endswith("/optimizer") for (_, r, _) in net.requests) == n_opt
    m2.forward_backward(inputs=_batch(1))
    assert m2.calculate_metric()["loss"] == pytest.approx(loss_before)  # the same weights, not a new adapter
    assert min(s for s in net.seq_ids(run.run_id)[-1:]) == last_seq + 1
    s2.detach()


def test_sampler(session, net):
    model = TransformersModel(session=session)
    run = model.add_adapter_to_model("default", {"rank": 4})
    sampler = Sampler(model)
    resp = sampler.sample([5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0), num_samples=2)
    assert len(resp.sequences) == 2 and all(len(s.tokens) == 3 and len(s.logprobs or []) == 3 for s in resp.sequences)
    assert resp.sequences[0].tokens == resp.sequences[1].tokens  # greedy: the same continuation
    body = [b for (_, r, b) in net.requests if r == "sample"][-1]
    assert body["run_id"] == run.run_id and body["base_model"] == "mock://tiny"
    lp = sampler.compute_logprobs([1, 2, 3])
    assert lp[0] is None and len(lp) == 3 and all(x is not None and x <= 0 for x in lp[1:])
    path = model.save("for-sampling", save_optimizer=False)
    ck = Sampler(checkpoint=path, session=session)
    assert len(ck.sample([1], {"max_tokens": 1}).sequences[0].tokens) == 1
    assert [b for (_, r, b) in net.requests if r == "sample"][-1]["checkpoint"] == path
    with pytest.raises(InvalidInputError) as ei:
        sampler.sample(3.5)
    assert ei.value.field == "prompt"


def test_adam_params_per_step_are_sent(session, net):
    model = TransformersModel(session=session)
    model.add_adapter_to_model("default", {"rank": 4})
    model.forward_backward(inputs=_batch())
    model.clip_grad_and_step(adam_params=AdamParams(learning_rate=0.01))
    body = [b for (_, r, b) in net.requests if r.endswith("/optim_step")][-1]
    assert body["adam_params"]["learning_rate"] == 0.01 and body["seq_id"] >= 1
    assert session.get_run(model.run_id).step == 1
