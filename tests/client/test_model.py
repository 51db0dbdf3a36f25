"""Remote model + sampler against the in-memory native API."""

from __future__ import annotations

import pytest
from fake_native_server import KEY

import twinkle_client
from twinkle.types import (
    AdamParams,
    InvalidInputError,
    LimitExceededError,
    LoraConfig,
    NotFoundError,
    SamplingParams,
)
from twinkle_client.model import MockModel, TransformersModel, to_lora_config
from twinkle_client.sampler import Sampler


def _batch(n: int = 2) -> list[dict]:
    return [{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5]} for _ in range(n)]


def _seq_ids(fake, run_id: str) -> list[int]:
    return [b["seq_id"] for (_, route, b) in fake.requests if route.startswith(f"runs/{run_id}/") and b and "seq_id" in b]


def test_training_loop_learns_and_sends_increasing_seq_ids(session, fake):
    model = TransformersModel(model_id="builtin://tiny", seed=3, session=session)
    run = model.add_adapter_to_model("default", LoraConfig(rank=8))
    assert fake.runs[run.run_id]["lora"]["seed"] == 3  # the model's seed seeds the adapter
    assert fake.runs[run.run_id]["name"] == "default"
    model.set_optimizer("AdamW", lr=0.2)
    losses = []
    for _ in range(5):
        out = model.forward_backward(inputs=_batch())
        assert len(out.loss_fn_outputs) == 2
        step = model.clip_grad_and_step()
        m = model.calculate_metric(is_training=True)
        losses.append(m["loss"])
        assert m["step"] == step["step"] and m["tokens"] == 8  # 4 input tokens per example (as twinkle.model.local counts)
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.5 * losses[0]
    assert step["lr"] == 0.2 and step["step"] == 5 and step["grad_norm"] > 0
    seqs = _seq_ids(fake, run.run_id)
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) == 10


def test_calculate_metric_matches_server_loss(session, fake):
    model = MockModel(session=session)  # no model_id: the first hosted base model
    assert model.model_id == "builtin://tiny"
    run = model.add_adapter_to_model("a", {"r": 4, "lora_alpha": 8})
    assert fake.runs[run.run_id]["lora"]["rank"] == 4 and fake.runs[run.run_id]["lora"]["alpha"] == 8
    w = fake.weight(run.run_id)
    model.forward_backward(inputs=_batch(3))
    assert model.calculate_metric()["loss"] == pytest.approx(w * w)
    model.forward(inputs=_batch(1))  # forward does not count toward the training loss
    assert model.calculate_metric()["tokens"] == 0
    model.forward(inputs=_batch(1))
    assert model.calculate_metric(is_training=False)["loss"] == pytest.approx(w * w)


def test_retry_after_lost_reply_is_not_applied_twice(session, fake):
    model = TransformersModel(session=session)
    run = model.add_adapter_to_model("default", {"rank": 4})
    model.set_optimizer("SGD", lr=0.1)
    fake.drop_next_response = 1  # the server does the work, the reply is lost, the client retries
    model.forward_backward(inputs=_batch())
    fbs = [e for e in fake.executions if e[0] == run.run_id and e[1] == "forward_backward"]
    assert len(fbs) == 1
    sent = [b["seq_id"] for (_, r, b) in fake.requests if r.endswith("/forward_backward")]
    assert sent == [sent[0], sent[0]]  # the retry carried the same seq_id


def test_typed_errors_name_the_field(session, fake):
    with pytest.raises(NotFoundError, match="not hosted") as ei:
        TransformersModel(model_id="Qwen/Qwen3-0.6B", session=session)
    assert ei.value.field == "model_id"
    model = TransformersModel(session=session)
    with pytest.raises(InvalidInputError, match="add_adapter_to_model"):
        model.forward_backward(inputs=_batch())
    with pytest.raises(LimitExceededError, match="exceeds max LoRA rank") as ei:
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


def test_peft_like_config_is_read_by_attribute():
    class PeftLike:
        r = 16
        lora_alpha = 32
        lora_dropout = 0.05
        target_modules = {"q_proj", "v_proj"}

    cfg = to_lora_config(PeftLike())
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules) == (16, 32, 0.05, ["q_proj", "v_proj"])
    with pytest.raises(InvalidInputError) as ei:
        to_lora_config(42)
    assert ei.value.field == "config"


def test_save_load_and_checkpoints(session, fake):
    model = TransformersModel(session=session)
    run = model.add_adapter_to_model("default", {"rank": 4})
    model.set_optimizer("AdamW", lr=0.2)
    model.forward_backward(inputs=_batch())
    model.clip_grad_and_step()
    path = model.save("step-1")
    assert path == f"tinker://{run.run_id}/weights/step-1"
    w_saved = fake.weight(run.run_id)
    model.forward_backward(inputs=_batch())
    model.clip_grad_and_step()
    assert fake.weight(run.run_id) != w_saved
    model.load("step-1")
    assert fake.weight(run.run_id) == w_saved
    assert [c.name for c in model.checkpoints()] == ["step-1"]
    assert model.save("final", save_optimizer=False).endswith("/sampler_weights/final")


def test_reattach_continues_seq_ids_and_skips_same_optimizer(fake):
    s1 = twinkle_client.connect("http://fake", KEY, transport=fake.transport(), heartbeat=False)
    m1 = TransformersModel(session=s1)
    run = m1.add_adapter_to_model("default", {"rank": 4})
    m1.set_optimizer("AdamW", lr=0.2)
    for _ in range(3):
        m1.forward_backward(inputs=_batch())
        m1.clip_grad_and_step()
    last_seq = max(_seq_ids(fake, run.run_id))
    s1.detach()  # killed: no close
    # a new process: same notebook cells, re-attached session
    s2 = twinkle_client.connect("http://fake", KEY, session_id=s1.session_id, transport=fake.transport(), heartbeat=False)
    m2 = TransformersModel(session=s2)
    run2 = m2.add_adapter_to_model("default", {"rank": 4})
    assert run2.run_id == run.run_id and len(fake.runs) == 1
    n_opt = sum(e[1] == "optimizer" for e in fake.executions)
    m2.set_optimizer("AdamW", lr=0.2)  # unchanged settings: optimizer state is kept
    assert sum(e[1] == "optimizer" for e in fake.executions) == n_opt
    w = fake.weight(run.run_id)
    m2.forward_backward(inputs=_batch())
    assert m2.calculate_metric()["loss"] == pytest.approx(w * w)
    assert min(s for s in _seq_ids(fake, run.run_id)[-1:]) == last_seq + 1
    s2.detach()


def test_sampler(session, fake):
    model = TransformersModel(session=session)
    run = model.add_adapter_to_model("default", {"rank": 4})
    sampler = Sampler(model)
    resp = sampler.sample([5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0), num_samples=2)
    assert [s.tokens for s in resp.sequences] == [[7, 8, 9], [8, 9, 10]]
    body = [b for (_, r, b) in fake.requests if r == "sample"][-1]
    assert body["run_id"] == run.run_id and body["base_model"] == "builtin://tiny"
    assert sampler.compute_logprobs([1, 2, 3]) == [None, -1.0, -1.0]
    ck = Sampler(checkpoint="tinker://x/sampler_weights/y", session=session)
    ck.sample([1], {"max_tokens": 1})
    assert [b for (_, r, b) in fake.requests if r == "sample"][-1]["checkpoint"] == "tinker://x/sampler_weights/y"
    with pytest.raises(InvalidInputError) as ei:
        sampler.sample(3.5)
    assert ei.value.field == "prompt"


def test_adam_params_per_step_are_sent(session, fake):
    model = TransformersModel(session=session)
    model.add_adapter_to_model("default", {"rank": 4})
    model.forward_backward(inputs=_batch())
    model.clip_grad_and_step(adam_params=AdamParams(learning_rate=0.01))
    body = [b for (_, r, b) in fake.requests if r.endswith("/optim_step")][-1]
    assert body["adam_params"]["learning_rate"] == 0.01 and body["seq_id"] >= 1
