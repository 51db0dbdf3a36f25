"""TransformersBackend: adapters, LoRA config, mixed-adapter passes, accumulation, optimizer, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.live_lora import perturb_b
from twinkle.model.base import BatchItem
from twinkle.model.transformers import TransformersBackend
from twinkle.model.transformers._random import tiny_model_path
from twinkle.types import (
    AdamParams,
    Datum,
    InvalidInputError,
    LimitExceededError,
    LoraConfig,
    LRSchedulerConfig,
    ModelInput,
    NotFoundError,
    OptimizerConfig,
    UnsupportedError,
    datum_from_tokens,
)


@pytest.fixture(scope="module")
def backend():
    torch.set_num_threads(1)
    b = TransformersBackend(str(tiny_model_path()), device="cpu", max_adapters=8, max_lora_rank=64)
    yield b
    b.close()


def _data(n, length, seed, vocab=300):
    rng = np.random.default_rng(seed)
    return [datum_from_tokens(rng.integers(0, vocab, size=length + int(rng.integers(0, 5))).tolist()) for _ in range(n)]


SCALE = 0.05


def _randomize_b(backend, name, seed):
    perturb_b(backend, name, seed, SCALE)


def _grads(backend, name):
    return [p.grad.clone() if p.grad is not None else None for p in backend._adapters[name].parameters()]


def _zero(backend, name):
    for p in backend._adapters[name].parameters():
        p.grad = None


@pytest.fixture
def adapters(backend):
    made = []

    def add(name, **kw):
        backend.add_adapter(name, LoraConfig(**kw))
        made.append(name)
        return name

    yield add
    for n in made:
        if n in backend.list_adapters():
            backend.remove_adapter(n)


def test_mixed_batch_matches_separate_passes(backend, adapters):
    names = [adapters("m0", rank=4, seed=1), adapters("m1", rank=8, seed=2, train_mlp=False),
             adapters("m2", rank=2, seed=3, target_modules=["q_proj", "v_proj"]), adapters("m3", rank=8, seed=4, alpha=8)]
    # lengths 12..16 in every group (padding is exercised). Groups of very different lengths pad to another
    # width, which changes float32 summation order inside attention (relative differences ~1e-7).
    data = {n: _data(3, 12, seed=10 + i) for i, n in enumerate(names)}
    for i, n in enumerate(names):
        _randomize_b(backend, n, i)
    mixed = backend.run_batch([BatchItem(n, data[n]) for n in names] + [BatchItem(None, data["m0"], forward_only=True)])
    g_mixed = {n: _grads(backend, n) for n in names}
    for n in names:
        _zero(backend, n)
    for i, n in enumerate(names):
        sep = backend.run_batch([BatchItem(n, data[n])])[0]
        assert sep.metrics["loss:sum"] == pytest.approx(mixed[i].metrics["loss:sum"], abs=1e-4)
        for a, b in zip(g_mixed[n], _grads(backend, n), strict=True):
            assert a is not None and b is not None and float(a.abs().max()) > 0
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        _zero(backend, n)
    # the adapter=None item saw the base model only: equal to an independent HF model's logprobs
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model_path()), dtype=torch.float32)
    for d, out in zip(data["m0"], mixed[-1].loss_fn_outputs, strict=True):
        ids = torch.tensor([d.model_input.to_ints()])
        lp = torch.log_softmax(ref(input_ids=ids).logits[0].float(), -1)
        tgt = torch.tensor(d.loss_fn_inputs["target_tokens"].data)
        want = lp.gather(-1, tgt[:, None]).squeeze(-1)
        np.testing.assert_allclose(out["logprobs"].to_numpy(), want.detach().numpy(), atol=1e-5)


def test_lora_config_targets_and_seed(backend, adapters):
    q = adapters("t_q", rank=2, target_modules=["q_proj"])
    assert all(m.endswith("q_proj") for m in backend._adapters[q].modules)
    no_attn = adapters("t_mlp", rank=2, train_attn=False, train_unembed=False)
    mods = backend._adapters[no_attn].modules
    assert mods and all(".mlp." in m for m in mods)
    with_head = adapters("t_head", rank=2, train_attn=False, train_mlp=False, train_unembed=True)
    assert backend._adapters[with_head].modules == ["lm_head"]
    s1, s1b, s2 = adapters("s1", rank=4, seed=7), adapters("s1b", rank=4, seed=7), adapters("s2", rank=4, seed=8)
    pa, pb, pc = (backend._adapters[n].parameters()[0] for n in (s1, s1b, s2))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    with pytest.raises(InvalidInputError) as e:
        backend.add_adapter("bad", LoraConfig(target_modules=["nonexistent_proj"]))
    assert e.value.field == "lora.target_modules"
    with pytest.raises(InvalidInputError):
        backend.add_adapter("bad", LoraConfig(train_attn=False, train_mlp=False, train_unembed=False))
    with pytest.raises(LimitExceededError) as e:
        backend.add_adapter("bad", LoraConfig(rank=128))
    assert e.value.field == "lora.rank"
    with pytest.raises(InvalidInputError):
        backend.add_adapter(q, LoraConfig(rank=2))
    assert "bad" not in backend.list_adapters()


def test_adapter_limit_and_remove(backend, adapters):
    free = backend.max_adapters - len(backend.list_adapters())
    for i in range(free):
        adapters(f"lim{i}", rank=1)
    with pytest.raises(LimitExceededError):
        backend.add_adapter("one_too_many", LoraConfig(rank=1))
    backend.remove_adapter("lim0")
    assert "lim0" not in backend.list_adapters()
    assert all("lim0" not in layer.adapters for layer in backend._layers.values())
    with pytest.raises(NotFoundError):
        backend.remove_adapter("lim0")


def test_fresh_adapter_equals_base_and_dropout_only_in_training(backend, adapters):
    n = adapters("drop", rank=4, dropout=0.5, seed=3)
    data = _data(2, 10, seed=5)
    base = backend.run_batch([BatchItem(None, data, forward_only=True)])[0]
    fresh = backend.run_batch([BatchItem(n, data, forward_only=True)])[0]
    assert base.metrics["loss:sum"] == pytest.approx(fresh.metrics["loss:sum"], abs=1e-5)  # B = 0
    _randomize_b(backend, n, 1)
    f1 = backend.run_batch([BatchItem(n, data, forward_only=True)])[0].metrics["loss:sum"]
    f2 = backend.run_batch([BatchItem(n, data, forward_only=True)])[0].metrics["loss:sum"]
    t1 = backend.run_batch([BatchItem(n, data)])[0].metrics["loss:sum"]
    assert f1 == f2 and t1 != pytest.approx(f1, abs=1e-6)


def test_gradient_accumulation_across_calls(backend, adapters):
    a, b = adapters("acc_a", rank=4, seed=1), adapters("acc_b", rank=4, seed=1)
    data = _data(4, 10, seed=9)
    for n in (a, b):
        backend.set_optimizer(n, OptimizerConfig(lr=1e-2))
    backend.run_batch([BatchItem(a, data[:2])])
    backend.run_batch([BatchItem(a, data[2:])])
    backend.run_batch([BatchItem(b, data)])
    for x, y in zip(backend._adapters[a].parameters(), backend._adapters[b].parameters(), strict=True):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-5, rtol=1e-5)
    backend.optim_step(a)
    backend.optim_step(b)
    for x, y in zip(backend._adapters[a].parameters(), backend._adapters[b].parameters(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
        assert x.grad is None
    assert backend.step_count(a) == 1


def test_optimizer_schedule_override_clip_and_weight_decay(backend, adapters):
    n = adapters("opt", rank=4, seed=2)
    data = _data(2, 8, seed=1)
    backend.set_optimizer(n, OptimizerConfig(lr=0.1))
    backend.set_lr_scheduler(n, LRSchedulerConfig(name="linear", warmup_steps=2, total_steps=4))
    lrs = []
    for _ in range(4):
        backend.run_batch([BatchItem(n, data)])
        lrs.append(backend.optim_step(n)["lr:mean"])
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.05])
    # AdamParams override the configured optimizer for one step (Tinker): decay only, as grads of A are 0 when B=0
    w = adapters("wd", rank=4, seed=2)
    a0 = backend._adapters[w].pairs["lm_head"].lora_A.detach().clone()
    backend.run_batch([BatchItem(w, data)])
    m = backend.optim_step(w, AdamParams(learning_rate=0.5, weight_decay=0.1))
    assert m["lr:mean"] == 0.5
    torch.testing.assert_close(backend._adapters[w].pairs["lm_head"].lora_A.detach(), a0 * (1 - 0.5 * 0.1))
    # SGD with lr 1: the update IS the (clipped) gradient
    s = adapters("sgd", rank=4, seed=2)
    _randomize_b(backend, s, 3)
    backend.set_optimizer(s, OptimizerConfig(name="sgd", lr=1.0, grad_clip_norm=0.01))
    before = [p.detach().clone() for p in backend._adapters[s].parameters()]
    backend.run_batch([BatchItem(s, data)])
    m = backend.optim_step(s)
    delta = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(backend._adapters[s].parameters(), before, strict=True)))
    assert m["grad_norm:mean"] > 0.01
    assert float(delta) == pytest.approx(0.01, rel=1e-3)


def test_validation_names_field_and_changes_nothing(backend, adapters):
    n = adapters("val", rank=2)
    good = BatchItem(n, _data(1, 6, seed=2))
    vocab = backend.vocab_size

    def fails(item, err, field):
        with pytest.raises(err) as e:
            backend.run_batch([good, item])
        assert e.value.field == field, e.value.field
        assert all(p.grad is None for p in backend._adapters[n].parameters())

    fails(BatchItem(n, [datum_from_tokens([1, vocab + 5, 3])]), InvalidInputError, "data[0].model_input.tokens")
    fails(BatchItem(n, [Datum(model_input=ModelInput.empty(), loss_fn_inputs={"target_tokens": []})]),
          InvalidInputError, "data[0].model_input")
    fails(BatchItem(n, []), InvalidInputError, "data")
    bad_len = Datum(model_input=ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"target_tokens": [2, 3], "weights": [1, 1, 1]})
    fails(BatchItem(n, [bad_len]), InvalidInputError, "data[0].loss_fn_inputs.target_tokens")
    fails(BatchItem(n, good.data, loss_fn="nope"), UnsupportedError, "loss_fn")
    fails(BatchItem("ghost", good.data), NotFoundError, "adapter")
    fails(BatchItem(n, good.data, loss_fn="ppo"), InvalidInputError, "data[0].loss_fn_inputs.logprobs")
    no_tgt = Datum(model_input=ModelInput.from_ints([1, 2]), loss_fn_inputs={})
    fails(BatchItem(n, [no_tgt]), InvalidInputError, "data[0].loss_fn_inputs.target_tokens")
    fails(BatchItem(None, good.data), InvalidInputError, "adapter")
    fails(BatchItem(n, good.data, loss_fn="dpo"), InvalidInputError, "data")
    with pytest.raises(NotFoundError):
        backend.optim_step("ghost")


def test_rl_losses_and_dpo_run_through_backend(backend, adapters):
    n = adapters("rl", rank=4, seed=5)
    _randomize_b(backend, n, 5)
    base = _data(2, 8, seed=3)
    fwd = backend.run_batch([BatchItem(n, base, forward_only=True)])[0]
    rl = []
    for d, o in zip(base, fwd.loss_fn_outputs, strict=True):
        k = d.model_input.length
        rl.append(Datum(model_input=d.model_input, loss_fn_inputs={
            "target_tokens": d.loss_fn_inputs["target_tokens"], "logprobs": o["logprobs"].to_numpy(),
            "advantages": np.ones(k, dtype=np.float32)}))
    out = backend.run_batch([BatchItem(n, rl, loss_fn="importance_sampling")])[0]
    # r = 1 at the sampling policy, so the loss is minus the number of tokens
    assert out.metrics["loss:sum"] == pytest.approx(-sum(d.model_input.length for d in rl), abs=1e-4)
    for loss in ("ppo", "cispo", "dro"):
        assert "loss:sum" in backend.run_batch([BatchItem(n, rl, loss_fn=loss)])[0].metrics
    dpo = backend.run_batch([BatchItem(n, base, loss_fn="dpo", loss_fn_config={"beta": 0.2})])[0]
    # reference = adapter disabled: check the margin by hand from two forward passes
    lp_ad = [o["logprobs"].to_numpy() for o in fwd.loss_fn_outputs]
    ref = backend.run_batch([BatchItem(None, base, forward_only=True)])[0]
    lp_ref = [o["logprobs"].to_numpy() for o in ref.loss_fn_outputs]
    margin = 0.2 * ((lp_ad[0] - lp_ref[0]).sum() - (lp_ad[1] - lp_ref[1]).sum())
    assert dpo.metrics["dpo_margin:mean"] == pytest.approx(margin, abs=1e-4)
    assert dpo.metrics["loss:sum"] == pytest.approx(np.log1p(np.exp(-margin)), abs=1e-4)
    _zero(backend, n)
