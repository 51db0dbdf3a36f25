"""The Backend contract (``twinkle/model/base.py``), run against every backend available here.

"mock" always runs; "transformers" runs when ``twinkle.model.transformers`` imports (on ``builtin://tiny``
when ``twinkle.model.hub`` exists, else on the backend's random tiny Qwen2); "megatron" when ``twinkle.model.megatron`` exports ``MegatronBackend``.
Each test uses its own adapters on one backend per module, so the tests do not depend on each other.
"""

from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from twinkle.model.base import Backend, BatchItem, SampleItem
from twinkle.types import (
    AdamParams,
    Datum,
    InvalidInputError,
    LoraConfig,
    LRSchedulerConfig,
    ModelInput,
    NotFoundError,
    OptimizerConfig,
    SamplingParams,
    TwinkleError,
    datum_from_tokens,
)


@dataclass
class _Setup:
    backend: Backend
    lr: float  # a learning rate at which 20 steps clearly lower the loss
    atol: float  # tolerance for "the same computation done two ways"


def _make_mock() -> _Setup:
    from twinkle.model.mock import MockBackend

    return _Setup(MockBackend("mock://tiny", seed=0), lr=2e-2, atol=1e-8)


def _tiny_model_id() -> str:
    """``builtin://tiny`` when ``twinkle.model.hub`` exists, else the transformers backend's random tiny model."""
    try:
        importlib.import_module("twinkle.model.hub")
        return "builtin://tiny"
    except ImportError:
        pass
    try:
        random_models = importlib.import_module("twinkle.model.transformers._random")
    except ImportError as e:
        pytest.skip(f"no builtin models: {e}")
    return str(random_models.tiny_model_path())


def _make_transformers() -> _Setup:
    try:
        mod = importlib.import_module("twinkle.model.transformers")
    except ImportError as e:
        pytest.skip(f"transformers backend unavailable: {e}")
    import torch

    torch.set_num_threads(1)
    return _Setup(mod.TransformersBackend(_tiny_model_id()), lr=1e-2, atol=2e-5)


def _make_megatron() -> _Setup:
    try:
        mod = importlib.import_module("twinkle.model.megatron")
    except ImportError as e:
        pytest.skip(f"megatron backend unavailable: {e}")
    if not hasattr(mod, "MegatronBackend"):
        pytest.skip("twinkle.model.megatron has no MegatronBackend yet")
    return _Setup(mod.MegatronBackend(_tiny_model_id()), lr=1e-2, atol=2e-5)


_FACTORIES = {"mock": _make_mock, "transformers": _make_transformers, "megatron": _make_megatron}
_names = itertools.count()


@pytest.fixture(scope="module", params=list(_FACTORIES))
def setup(request: pytest.FixtureRequest) -> Any:
    s = _FACTORIES[request.param]()
    yield s
    s.backend.close()


def _new(setup: _Setup, seed: int = 1, rank: int = 4, **kw: Any) -> str:
    name = f"a{next(_names)}"
    setup.backend.add_adapter(name, LoraConfig(rank=rank, seed=seed, **kw))
    setup.backend.set_optimizer(name, OptimizerConfig(lr=setup.lr, eps=1e-8))
    return name


def _seq(seed: int, n: int = 12) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(1, 200, n)]


def _batch(seed: int, rows: int = 2, n: int = 12) -> list[Datum]:
    return [datum_from_tokens(_seq(seed * 100 + r, n)) for r in range(rows)]


def _fb(b: Backend, adapter: str | None, data: list[Datum], **kw: Any) -> Any:
    return b.run_batch([BatchItem(adapter, data, **kw)])[0]


def _lps(out: Any) -> list[np.ndarray]:
    return [o["logprobs"].to_numpy().astype(np.float64) for o in out.loss_fn_outputs]


def _assert_same(a: Any, b: Any, atol: float) -> None:
    for x, y in zip(_lps(a), _lps(b), strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def _probe(setup: _Setup, adapter: str) -> list[np.ndarray]:
    return _lps(_fb(setup.backend, adapter, _batch(99), forward_only=True))


# -- adapters ------------------------------------------------------------------------------------------------
def test_add_list_remove_adapters(setup: _Setup) -> None:
    b = setup.backend
    a = _new(setup, rank=4)
    assert a in b.list_adapters()
    assert b.adapter_config(a).rank == 4
    assert b.step_count(a) == 0
    with pytest.raises(TwinkleError) as e:
        b.add_adapter(a, LoraConfig(rank=4))
    assert e.value.field == "adapter"
    b.remove_adapter(a)
    assert a not in b.list_adapters()
    with pytest.raises(NotFoundError) as e:
        b.remove_adapter(a)
    assert e.value.field == "adapter"


def test_fresh_adapter_equals_base_model(setup: _Setup) -> None:
    a = _new(setup)
    data = _batch(3)
    _assert_same(_fb(setup.backend, a, data, forward_only=True), _fb(setup.backend, None, data, forward_only=True),
                 setup.atol)


# -- training ---------------------------------------------------------------------------------------------------
def test_loss_falls_over_20_steps(setup: _Setup) -> None:
    b, a = setup.backend, _new(setup)
    data = _batch(5, rows=2, n=16)
    losses = []
    for _ in range(20):
        losses.append(_fb(b, a, data).metrics["loss:sum"])
        b.optim_step(a)
    assert b.step_count(a) == 20
    assert losses[-1] < 0.5 * losses[0], losses


def test_outputs_are_per_datum_logprobs_with_sum_loss(setup: _Setup) -> None:
    a = _new(setup)
    data = _batch(6, rows=3, n=9)
    out = _fb(setup.backend, a, data)
    lps = _lps(out)
    assert [x.shape for x in lps] == [(8,)] * 3
    assert all((x <= 0).all() for x in lps)
    assert out.metrics["loss:sum"] == pytest.approx(-sum(x.sum() for x in lps), rel=1e-5)
    setup.backend.optim_step(a)


def test_mixed_adapter_batch_equals_separate_passes(setup: _Setup) -> None:
    b = setup.backend
    # Two pairs of identical adapters (same seed, same history) that differ from each other.
    a1, a2, c1, c2 = _new(setup, seed=1), _new(setup, seed=1), _new(setup, seed=2), _new(setup, seed=2)
    for name, data in ((a1, _batch(10)), (a2, _batch(10)), (c1, _batch(11)), (c2, _batch(11))):
        _fb(b, name, data)
        b.optim_step(name)
    da, dc = _batch(12, rows=2), _batch(13, rows=3, n=7)
    mixed = b.run_batch([BatchItem(a1, da), BatchItem(c1, dc), BatchItem(None, da, forward_only=True)])
    sep_a, sep_c = _fb(b, a2, da), _fb(b, c2, dc)
    base = _fb(b, None, da, forward_only=True)
    _assert_same(mixed[0], sep_a, setup.atol)
    _assert_same(mixed[1], sep_c, setup.atol)
    _assert_same(mixed[2], base, setup.atol)
    assert mixed[0].metrics["loss:sum"] == pytest.approx(sep_a.metrics["loss:sum"], rel=1e-5)
    assert not np.allclose(_lps(mixed[0])[0], _lps(base)[0], atol=1e-3)  # the adapter does matter
    for name in (a1, a2, c1, c2):
        b.optim_step(name)
    for x, y in ((a1, a2), (c1, c2)):
        for p, q in zip(_probe(setup, x), _probe(setup, y), strict=True):
            np.testing.assert_allclose(p, q, atol=setup.atol * 10, rtol=0)


def test_gradient_accumulation_matches_full_batch(setup: _Setup) -> None:
    b = setup.backend
    full, split = _new(setup, seed=3), _new(setup, seed=3)
    data = _batch(20, rows=4, n=10)
    for _ in range(2):
        _fb(b, full, data)
        b.optim_step(full)
        _fb(b, split, data[:2])
        _fb(b, split, data[2:])
        b.optim_step(split)
    for p, q in zip(_probe(setup, full), _probe(setup, split), strict=True):
        np.testing.assert_allclose(p, q, atol=setup.atol * 10, rtol=0)


def test_per_step_adam_params_override_and_scheduler(setup: _Setup) -> None:
    b = setup.backend
    configured, explicit, frozen = _new(setup, seed=4), _new(setup, seed=4), _new(setup, seed=4)
    data = _batch(30)
    before = _probe(setup, frozen)
    for name in (configured, explicit, frozen):
        _fb(b, name, data)
    m1 = b.optim_step(configured)
    m2 = b.optim_step(explicit, AdamParams(learning_rate=setup.lr, beta1=0.9, beta2=0.95, eps=1e-8))
    m3 = b.optim_step(frozen, AdamParams(learning_rate=0.0))
    assert m1["lr:mean"] == pytest.approx(setup.lr)
    assert m2["lr:mean"] == pytest.approx(setup.lr)
    assert m3["lr:mean"] == 0.0
    for p, q in zip(_probe(setup, configured), _probe(setup, explicit), strict=True):
        np.testing.assert_allclose(p, q, atol=setup.atol * 10, rtol=0)
    for p, q in zip(_probe(setup, frozen), before, strict=True):
        np.testing.assert_allclose(p, q, atol=setup.atol, rtol=0)
    assert b.step_count(frozen) == 1

    sched = _new(setup, seed=4)
    b.set_lr_scheduler(sched, LRSchedulerConfig(name="linear", warmup_steps=2, total_steps=4))
    lrs = []
    for _ in range(4):
        _fb(b, sched, data)
        lrs.append(b.optim_step(sched)["lr:mean"])
    assert lrs == pytest.approx([setup.lr * f for f in (0.5, 1.0, 1.0, 0.5)])


def test_forward_only_does_not_change_the_next_step(setup: _Setup) -> None:
    b = setup.backend
    x, y = _new(setup, seed=5), _new(setup, seed=5)
    _fb(b, x, _batch(40), forward_only=True)
    assert b.step_count(x) == 0
    data = _batch(41)
    lx, ly = _fb(b, x, data).metrics["loss:sum"], _fb(b, y, data).metrics["loss:sum"]
    assert lx == pytest.approx(ly, rel=1e-6)
    b.optim_step(x)
    b.optim_step(y)
    for p, q in zip(_probe(setup, x), _probe(setup, y), strict=True):
        np.testing.assert_allclose(p, q, atol=setup.atol * 10, rtol=0)


def test_rl_losses_train(setup: _Setup) -> None:
    b = setup.backend
    a = _new(setup, seed=6)
    seq = _seq(50, 10)
    base = _lps(_fb(b, None, [datum_from_tokens(seq)], forward_only=True))[0]
    datum = Datum(
        model_input=ModelInput.from_ints(seq[:-1]),
        loss_fn_inputs={
            "target_tokens": np.asarray(seq[1:], dtype=np.int64),
            "logprobs": base.astype(np.float32),
            "advantages": np.ones(9, dtype=np.float32),
        },
    )
    for loss in ("importance_sampling", "ppo", "cispo", "dro"):
        out = _fb(b, a, [datum], loss_fn=loss)
        assert np.isfinite(out.metrics["loss:sum"])
        assert _lps(out)[0].shape == (9,)
    b.optim_step(a)
    # Positive advantages everywhere: the sequence got more likely.
    after = _lps(_fb(b, a, [datum], forward_only=True))[0]
    assert after.sum() > base.sum()


# -- checkpoints -------------------------------------------------------------------------------------------------
def test_save_load_exact_resume(setup: _Setup, tmp_path: Any) -> None:
    b = setup.backend
    a = _new(setup, seed=7)
    b.set_lr_scheduler(a, LRSchedulerConfig(name="cosine", warmup_steps=1, total_steps=10))
    data, nxt = _batch(60), _batch(61)
    for _ in range(3):
        _fb(b, a, data)
        b.optim_step(a)
    b.save(a, tmp_path / "ckpt", optimizer=True)
    _fb(b, a, nxt)
    b.optim_step(a)
    expected = _fb(b, a, nxt, forward_only=True).metrics["loss:sum"]

    r = f"r{next(_names)}"
    cfg = b.load(r, tmp_path / "ckpt", optimizer=True)
    assert cfg.rank == 4
    assert b.step_count(r) == 3
    _fb(b, r, nxt)
    b.optim_step(r)
    got = _fb(b, r, nxt, forward_only=True).metrics["loss:sum"]
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_weights_only_checkpoint_gives_same_logprobs(setup: _Setup, tmp_path: Any) -> None:
    b = setup.backend
    a = _new(setup, seed=8)
    _fb(b, a, _batch(70))
    b.optim_step(a)
    b.save(a, tmp_path / "w", optimizer=False)
    assert (tmp_path / "w" / "adapter_config.json").is_file()
    assert (tmp_path / "w" / "adapter_model.safetensors").is_file()
    r = f"r{next(_names)}"
    b.load(r, tmp_path / "w", optimizer=False)
    for p, q in zip(_probe(setup, a), _probe(setup, r), strict=True):
        np.testing.assert_allclose(p, q, atol=setup.atol, rtol=0)
    with pytest.raises(NotFoundError) as e:
        b.load(f"r{next(_names)}", tmp_path / "missing")
    assert e.value.field == "path"


# -- validation ---------------------------------------------------------------------------------------------------
def _bad_datums(vocab: int) -> list[tuple[Datum, str]]:
    ok = _seq(80, 6)
    return [
        (datum_from_tokens(ok[:3] + [vocab + 5] + ok[3:]), "data[0].model_input"),
        (Datum(model_input=ModelInput.empty(), loss_fn_inputs={"target_tokens": np.zeros(0, dtype=np.int64)}),
         "data[0].model_input"),
        (Datum(model_input=ModelInput.from_ints(ok[:-1]),
               loss_fn_inputs={"target_tokens": np.asarray(ok[1:]), "weights": np.ones(3, dtype=np.float32)}),
         "data[0].loss_fn_inputs.weights"),
        (Datum(model_input=ModelInput.from_ints(ok[:-1]),
               loss_fn_inputs={"target_tokens": np.asarray(ok[1:]) * 0 + vocab + 1}),
         "data[0].loss_fn_inputs.target_tokens"),
    ]


def test_bad_input_names_the_field_and_changes_nothing(setup: _Setup) -> None:
    b = setup.backend
    vocab = b.model_info().vocab_size
    a, ref = _new(setup, seed=9), _new(setup, seed=9)
    good = _batch(81)
    for datum, field in _bad_datums(vocab):
        with pytest.raises(InvalidInputError) as e:
            b.run_batch([BatchItem(a, good), BatchItem(a, [datum])])
        assert e.value.field is not None and e.value.field.startswith(field), (e.value.field, field)
    with pytest.raises(TwinkleError) as e:
        _fb(b, a, good, loss_fn="no_such_loss")
    assert e.value.field == "loss_fn" and e.value.category == "user"
    with pytest.raises(InvalidInputError) as e:
        _fb(b, a, [])
    assert e.value.field == "data"
    with pytest.raises(TwinkleError) as e:
        _fb(b, a, good, loss_fn="ppo")  # ppo needs logprobs and advantages
    assert e.value.field is not None and e.value.field.startswith("data[0].loss_fn_inputs.")
    with pytest.raises(InvalidInputError) as e:
        _fb(b, None, good)  # the base model cannot train
    assert e.value.field == "adapter"
    for call in (lambda: _fb(b, "nobody", good), lambda: b.optim_step("nobody"),
                 lambda: b.sample([SampleItem("nobody", [1, 2])])):
        with pytest.raises(NotFoundError) as e:
            call()
        assert e.value.field == "adapter"
    with pytest.raises(InvalidInputError) as e:
        b.sample([SampleItem(a, [1, vocab + 3])])
    assert e.value.field == "prompt"
    # Nothing was accumulated by the failed calls: one clean step equals a fresh adapter's step.
    _fb(b, a, good)
    _fb(b, ref, good)
    b.optim_step(a)
    b.optim_step(ref)
    for p, q in zip(_probe(setup, a), _probe(setup, ref), strict=True):
        np.testing.assert_allclose(p, q, atol=setup.atol * 10, rtol=0)


# -- sampling --------------------------------------------------------------------------------------------------------
def _sample(b: Backend, adapter: str | None, prompt: list[int], n: int = 1, **params: Any) -> Any:
    return b.sample([SampleItem(adapter, prompt, n, SamplingParams(**params))])[0]


def test_sampling_determinism(setup: _Setup) -> None:
    b = setup.backend
    a = _new(setup, seed=10)
    _fb(b, a, _batch(90))
    b.optim_step(a)
    prompt = _seq(91, 5)
    g1 = _sample(b, a, prompt, 2, max_tokens=8, temperature=0.0, stop=[])
    g2 = _sample(b, a, prompt, 1, max_tokens=8, temperature=0.0, stop=[])
    assert g1.sequences[0].tokens == g1.sequences[1].tokens == g2.sequences[0].tokens
    assert len(g2.sequences[0].tokens) == 8 and g2.sequences[0].stop_reason == "length"
    s1 = _sample(b, a, prompt, 3, max_tokens=8, temperature=1.0, seed=123, stop=[])
    s2 = _sample(b, a, prompt, 3, max_tokens=8, temperature=1.0, seed=123, stop=[])
    s3 = _sample(b, a, prompt, 3, max_tokens=8, temperature=1.0, seed=124, stop=[])
    toks = lambda r: [s.tokens for s in r.sequences]  # noqa: E731
    assert toks(s1) == toks(s2)
    assert toks(s1) != toks(s3)
    assert _sample(b, a, prompt, 1, max_tokens=8, temperature=1.0, top_k=1, seed=5, stop=[]).sequences[0].tokens \
        == g2.sequences[0].tokens


def test_sampled_logprobs_match_forward(setup: _Setup) -> None:
    b = setup.backend
    a = _new(setup, seed=11)
    _fb(b, a, _batch(95))
    b.optim_step(a)
    prompt = _seq(96, 6)
    r = b.sample([SampleItem(a, prompt, 1, SamplingParams(max_tokens=6, temperature=1.0, seed=1, stop=[]),
                             prompt_logprobs=True)])[0]
    seq = r.sequences[0]
    full = prompt + seq.tokens
    lp = _lps(_fb(b, a, [datum_from_tokens(full)], forward_only=True))[0]
    np.testing.assert_allclose(seq.logprobs, lp[len(prompt) - 1:], atol=1e-4)
    assert r.prompt_logprobs is not None and r.prompt_logprobs[0] is None
    np.testing.assert_allclose(r.prompt_logprobs[1:], lp[: len(prompt) - 1], atol=1e-4)


def test_stop_tokens_and_strings(setup: _Setup) -> None:
    b = setup.backend
    a = _new(setup, seed=12)
    prompt = _seq(97, 5)
    free = _sample(b, a, prompt, max_tokens=10, temperature=0.0, stop=[]).sequences[0].tokens
    stop_tok = free[3]
    r = _sample(b, a, prompt, max_tokens=10, temperature=0.0, stop=[stop_tok]).sequences[0]
    assert r.stop_reason == "stop"
    assert r.tokens == free[: free.index(stop_tok) + 1]  # the stop token is included
    tok = b.tokenizer()
    if tok is None:
        return
    text = tok.decode(free[2:3])
    if not text:
        return
    r = _sample(b, a, prompt, max_tokens=10, temperature=0.0, stop=[text]).sequences[0]
    assert r.stop_reason == "stop"
    assert len(r.tokens) <= 3 and text in tok.decode(r.tokens)
    assert r.tokens == free[: len(r.tokens)]


def test_sampling_batch_mixes_adapters(setup: _Setup) -> None:
    b = setup.backend
    a = _new(setup, seed=13)
    for _ in range(3):
        _fb(b, a, _batch(98))
        b.optim_step(a)
    prompt = _seq(99, 5)
    params = SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    together = b.sample([SampleItem(a, prompt, 1, params), SampleItem(None, prompt, 1, params)])
    alone_a = b.sample([SampleItem(a, prompt, 1, params)])[0]
    alone_base = b.sample([SampleItem(None, prompt, 1, params)])[0]
    assert together[0].sequences[0].tokens == alone_a.sequences[0].tokens
    assert together[1].sequences[0].tokens == alone_base.sequences[0].tokens
    np.testing.assert_allclose(together[0].sequences[0].logprobs, alone_a.sequences[0].logprobs, atol=1e-4)
