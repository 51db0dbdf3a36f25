"""Every registered loss, on every backend, agrees with itself: values and gradients.

The test enumerates the registry, so a newly registered loss is covered without touching this file. The toy
loss below is the proof: one ``register_loss`` call and it runs through every check and every backend.

1. Function level: the torch implementation's value, metrics and autograd gradient (dLoss/dlogprobs) equal
   the numpy implementation's value, metrics and gradient, on random inputs built from the spec.
2. Backend level (mock, transformers, megatron when installed): a training ``forward_backward`` reports the
   loss the numpy implementation computes from the logprobs the backend returns, and the adapter gradients it
   accumulates equal those of ``cross_entropy`` with ``weights = −dLoss/dlogprobs`` (the chain rule: both
   are Σ_t g_t · dlp_t/dθ). So each backend's loss path and backward pass are checked for every loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from twinkle.loss import (
    ConfigKey,
    LossOutput,
    LossSpec,
    NumpyLossOutput,
    get_loss,
    list_losses,
    register_loss,
    unregister_loss,
)
from twinkle.model.base import BatchItem
from twinkle.types import Datum, InvalidInputError, LoraConfig, ModelInput, TensorData

torch = pytest.importorskip("torch")


# ---- the toy loss: ONE registration -----------------------------------------------------------------------
def _toy_torch(lps: list[Any], inputs: list[dict[str, Any]], config: dict[str, float]) -> LossOutput:
    """Σ w·(lp − c)², c = ``center``."""
    c = config["center"]
    parts = [((inp["weights"] if "weights" in inp else 1.0) * (lp - c) ** 2).sum() for lp, inp in zip(lps, inputs, strict=True)]
    loss = torch.stack(parts).sum()
    return LossOutput(loss, [{"logprobs": lp.detach()} for lp in lps], {"loss:sum": float(loss.detach())})


def _toy_numpy(lps: list[np.ndarray], inputs: list[dict[str, np.ndarray]], config: dict[str, float]) -> NumpyLossOutput:
    c, total, grads = config["center"], 0.0, []
    for lp, inp in zip(lps, inputs, strict=True):
        lp = np.asarray(lp, dtype=np.float64)
        w = np.asarray(inp["weights"], dtype=np.float64).reshape(lp.shape) if "weights" in inp else np.ones_like(lp)
        total += float((w * (lp - c) ** 2).sum())
        grads.append(2.0 * w * (lp - c))
    return NumpyLossOutput(total, grads, {"loss:sum": total})


TOY = register_loss(LossSpec("toy_square", _toy_torch, _toy_numpy, ("target_tokens",), ("weights",),
                             config=(ConfigKey("center", -1.0, le=0.0),)))


def teardown_module() -> None:
    unregister_loss(TOY.name)  # the rest of the session sees the built-in registry only


LOSSES = list_losses()  # the toy is in it: registered above, enumerated here like any other loss


def test_toy_is_enumerated() -> None:
    assert "toy_square" in LOSSES and {"cross_entropy", "ppo", "cispo", "dro", "dpo"} <= set(LOSSES)


# ---- inputs built from a spec -----------------------------------------------------------------------------
def _value(name: str, lp: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible value of loss input ``name`` for a datum whose learner logprobs are ``lp``."""
    if name == "weights":
        return rng.uniform(0.0, 1.5, lp.shape)
    if name in ("logprobs", "ref_logprobs"):  # near the learner's: ratios straddle the clip bounds
        return lp + rng.uniform(-0.6, 0.6, lp.shape)
    return rng.normal(0.0, 1.0, lp.shape)  # advantages, and any new float input


def _config(spec: LossSpec) -> dict[str, float]:
    """Non-default values inside each key's range, so a key the implementation ignores would show."""
    out = {}
    for k in spec.config:
        v = k.default * 1.5 + 0.1 if k.default >= 0 else k.default * 1.5
        if k.le is not None:
            v = min(v, k.le)
        out[k.name] = v
    if "clip_low_threshold" in out and "clip_high_threshold" in out:
        out["clip_low_threshold"], out["clip_high_threshold"] = 0.9, 1.15
    return spec.resolve_config(out)


def _inputs(spec: LossSpec, lps: list[np.ndarray], rng: np.random.Generator, optional: bool) -> list[dict[str, np.ndarray]]:
    names = [n for n in (spec.inputs if optional else spec.required_inputs) if n != "target_tokens"]
    return [{n: _value(n, lp, rng) for n in names} for lp in lps]


def _n_datums(spec: LossSpec) -> int:
    return 4 if spec.paired else 3


# ---- 1. torch and numpy implementations agree -------------------------------------------------------------
@pytest.mark.parametrize("optional", [True, False], ids=["all-inputs", "required-only"])
@pytest.mark.parametrize("name", LOSSES)
def test_torch_and_numpy_agree(name: str, optional: bool) -> None:
    spec = get_loss(name)
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    lps = [-rng.uniform(0.05, 3.0, int(rng.integers(3, 8))) for _ in range(_n_datums(spec))]
    inputs = _inputs(spec, lps, rng, optional)
    if spec.needs_reference:
        for lp, inp in zip(lps, inputs, strict=True):
            inp.setdefault("ref_logprobs", lp + rng.uniform(-0.5, 0.5, lp.shape))
    cfg = _config(spec)
    lp_t = [torch.tensor(lp, dtype=torch.float64, requires_grad=True) for lp in lps]
    inp_t = [{k: torch.tensor(v, dtype=torch.float64) for k, v in d.items()} for d in inputs]
    out = spec.fn(lp_t, inp_t, cfg)
    out.loss.backward()
    ref = spec.numpy_fn(lps, inputs, cfg)
    assert float(out.loss.detach()) == pytest.approx(ref.loss, rel=1e-9, abs=1e-9)
    assert set(out.metrics) == set(ref.metrics) and "loss:sum" in ref.metrics
    for key, v in ref.metrics.items():
        assert out.metrics[key] == pytest.approx(v, rel=1e-9, abs=1e-9), key
    assert len(out.outputs) == len(lps) and all("logprobs" in o for o in out.outputs)
    for t, g in zip(lp_t, ref.grads, strict=True):
        np.testing.assert_allclose(t.grad.numpy(), g, rtol=1e-9, atol=1e-12)


# ---- 2. every backend -------------------------------------------------------------------------------------
class _Probe:
    """A backend plus the two things the test reads from inside it: an adapter's gradients, and their reset."""

    def __init__(self, backend: Any, grads: Callable[[str], dict[str, np.ndarray]], zero: Callable[[str], None]):
        self.backend, self.grads, self.zero = backend, grads, zero


def _torch_probe(backend: Any) -> _Probe:
    def grads(a: str) -> dict[str, np.ndarray]:
        ps = backend._adapters[a].parameters()
        return {str(i): (p.grad.detach().double().cpu().numpy() if p.grad is not None else np.zeros(tuple(p.shape)))
                for i, p in enumerate(ps)}

    def zero(a: str) -> None:
        for p in backend._adapters[a].parameters():
            p.grad = None

    return _Probe(backend, grads, zero)


def _mock() -> _Probe:
    from twinkle.model.mock import MockBackend

    b = MockBackend(seed=3, embed_dim=16, hidden_dim=32)
    return _Probe(b, lambda a: {k: v.copy() for k, v in b._adapters[a].grads.items()},
                  lambda a: b._adapters[a].zero_grads())


def _transformers() -> _Probe:
    from twinkle.model.transformers import TransformersBackend
    from twinkle.model.transformers._random import tiny_model_path

    torch.set_num_threads(1)
    return _torch_probe(TransformersBackend(str(tiny_model_path()), device="cpu"))


def _megatron(tmp: Any) -> _Probe:
    pytest.importorskip("megatron.core")
    from twinkle.model.megatron import MegatronBackend
    from twinkle.model.transformers._random import build_random_model

    path = build_random_model(tmp / "mg", vocab_size=128, hidden_size=32, intermediate=64)
    return _torch_probe(MegatronBackend(str(path), device="cpu"))


@pytest.fixture(scope="module", params=["mock", "transformers", "megatron"])
def probe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    p = {"mock": _mock, "transformers": _transformers}.get(request.param)
    made = p() if p is not None else _megatron(tmp_path_factory.mktemp("parity"))
    b = made.backend
    b.add_adapter("p", LoraConfig(rank=4, seed=11))
    # A non-zero adapter, so that the adapter's logprobs differ from the base model's (the dpo reference).
    b.run_batch([BatchItem("p", _data(b, np.random.default_rng(0), 2), "cross_entropy")])
    b.optim_step("p")
    made.zero("p")
    yield made
    b.close()


def _vocab(b: Any) -> int:
    return int(b.model_info().vocab_size)


def _data(b: Any, rng: np.random.Generator, n: int) -> list[Datum]:
    v = _vocab(b)
    out = []
    for _ in range(n):
        k = int(rng.integers(4, 9))
        toks = rng.integers(0, v, k + 1)
        out.append(Datum(model_input=ModelInput.from_ints(toks[:-1].tolist()),
                         loss_fn_inputs={"target_tokens": TensorData.from_numpy(toks[1:].astype(np.int64))}))
    return out


def _lps(out: Any) -> list[np.ndarray]:
    return [o["logprobs"].to_numpy().astype(np.float64) for o in out.loss_fn_outputs]


@pytest.mark.parametrize("optional", [True, False], ids=["all-inputs", "required-only"])
@pytest.mark.parametrize("name", LOSSES)
def test_backend_loss_and_gradient(probe: _Probe, name: str, optional: bool) -> None:
    b, spec = probe.backend, get_loss(name)
    rng = np.random.default_rng(7)
    data = _data(b, rng, _n_datums(spec))
    base = _lps(b.run_batch([BatchItem(None, data, "cross_entropy", forward_only=True)])[0])
    learner = _lps(b.run_batch([BatchItem("p", data, "cross_entropy", forward_only=True)])[0])
    inputs = _inputs(spec, learner, rng, optional)
    # What travels is float32: round now, so that the numpy reference sees what the backend sees.
    inputs = [{k: v.astype(np.float32).astype(np.float64) for k, v in d.items()} for d in inputs]
    for d, inp in zip(data, inputs, strict=True):
        d.loss_fn_inputs.update({k: TensorData.from_numpy(v.astype(np.float32)) for k, v in inp.items()})
    cfg = _config(spec)

    out = b.run_batch([BatchItem("p", data, name, cfg)])[0]
    got_lps = _lps(out)
    for a, e in zip(got_lps, learner, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)  # same logprobs as the forward pass
    ref_inputs = [dict(inp) for inp in inputs]
    if spec.needs_reference:
        for inp, r in zip(ref_inputs, base, strict=True):
            inp.setdefault("ref_logprobs", r)
    expect = spec.numpy_fn(got_lps, ref_inputs, cfg)
    scale = 1.0 + abs(expect.loss)
    assert out.metrics["loss:sum"] == pytest.approx(expect.loss, rel=1e-4, abs=1e-4 * scale)
    for key, v in expect.metrics.items():
        assert out.metrics[key] == pytest.approx(v, rel=1e-4, abs=1e-4), key
    g_loss = probe.grads("p")
    probe.zero("p")

    surrogate = [Datum(model_input=d.model_input, loss_fn_inputs={
        "target_tokens": d.loss_fn_inputs["target_tokens"],
        "weights": TensorData.from_numpy((-g).astype(np.float32))}) for d, g in zip(data, expect.grads, strict=True)]
    b.run_batch([BatchItem("p", surrogate, "cross_entropy")])
    g_ce = probe.grads("p")
    probe.zero("p")
    norm = max(1e-6, max(float(np.abs(v).max()) for v in g_ce.values()))
    assert max(float(np.abs(v).max()) for v in g_loss.values()) > 0 or norm <= 1e-6
    for k, v in g_ce.items():
        np.testing.assert_allclose(g_loss[k], v, rtol=2e-3, atol=2e-4 * norm, err_msg=f"{name}: gradient {k}")


@pytest.mark.parametrize("beta", ["nan", "Infinity", float("inf"), -1.0])
def test_backend_refuses_bad_config_from_the_spec(probe: _Probe, beta: Any) -> None:
    """``dro`` with a non-finite beta is refused by every backend, by the same spec, and changes nothing."""
    b = probe.backend
    data = _data(b, np.random.default_rng(1), 2)
    for d in data:
        n = d.model_input.length
        d.loss_fn_inputs.update({"logprobs": TensorData.from_numpy(np.full(n, -1.0, np.float32)),
                                 "advantages": TensorData.from_numpy(np.ones(n, np.float32))})
    before = probe.grads("p")
    with pytest.raises(InvalidInputError) as e:
        b.run_batch([BatchItem("p", data, "dro", {"beta": beta})])
    assert e.value.field == "loss_fn_config.beta"
    for k, v in probe.grads("p").items():
        np.testing.assert_array_equal(v, before[k])
