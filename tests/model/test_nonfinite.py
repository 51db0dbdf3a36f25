"""A pass or step whose loss or gradient is NaN/infinite is not applied, on every backend: a 400
(``NonFiniteError``) says so, adapter weights and optimizer state stay bit-identical, and the run goes on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from twinkle.model.base import BatchItem
from twinkle.types import AdamParams, Datum, LoraConfig, ModelInput, NonFiniteError, TensorData


def _mock() -> tuple[Any, Any]:
    from twinkle.model.mock import MockBackend

    b = MockBackend(seed=0, embed_dim=16, hidden_dim=32)

    def poison(a: str) -> None:
        g = next(iter(b._adapters[a].grads.values()))
        g.flat[0] = np.nan

    return b, poison


def _torch_poison(b: Any):
    def poison(a: str) -> None:
        import torch

        p = b._adapters[a].parameters()[0]
        p.grad = torch.full_like(p, float("nan"))

    return poison


def _transformers(tmp: Path) -> tuple[Any, Any]:
    pytest.importorskip("torch")
    from twinkle.model.transformers import TransformersBackend
    from twinkle.model.transformers._random import tiny_model_path

    b = TransformersBackend(str(tiny_model_path()), device="cpu")
    return b, _torch_poison(b)


def _megatron(tmp: Path) -> tuple[Any, Any]:
    pytest.importorskip("torch")
    pytest.importorskip("megatron.core")
    from twinkle.model.megatron import MegatronBackend
    from twinkle.model.transformers._random import build_random_model

    b = MegatronBackend(str(build_random_model(tmp / "mg", vocab_size=128, hidden_size=32, intermediate=64)), device="cpu")
    return b, _torch_poison(b)


@pytest.fixture(scope="module", params=["mock", "transformers", "megatron"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("nf")
    b, poison = {"mock": lambda t: _mock(), "transformers": _transformers, "megatron": _megatron}[request.param](tmp)
    yield b, poison
    b.close()


def _data(vocab: int, seed: int, q: float | None = None) -> list[Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        toks = rng.integers(0, vocab, 7)
        inputs = {"target_tokens": TensorData.from_numpy(toks[1:].astype(np.int64))}
        if q is not None:
            inputs["logprobs"] = TensorData.from_numpy(np.full(6, q, np.float32))
            inputs["advantages"] = TensorData.from_numpy(np.ones(6, np.float32))
        out.append(Datum(model_input=ModelInput.from_ints(toks[:-1].tolist()), loss_fn_inputs=inputs))
    return out


def _snapshot(b: Any, a: str, path: Path) -> dict[str, bytes]:
    b.save(a, path, optimizer=True)
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.suffix in (".safetensors", ".npz", ".pt", ".bin")}


def test_nonfinite_loss_and_gradient_are_not_applied(backend, tmp_path: Path) -> None:
    b, poison = backend
    vocab = int(b.model_info().vocab_size)
    a = "nf"
    b.add_adapter(a, LoraConfig(rank=4, seed=3))
    adam = AdamParams(learning_rate=1e-2)
    b.run_batch([BatchItem(a, _data(vocab, 0))])
    b.optim_step(a, adam)  # optimizer state exists
    before = _snapshot(b, a, tmp_path / "before")
    assert before, "the checkpoint holds weight files"
    step = b.step_count(a)

    # 1. A finite but extreme input makes the loss infinite: refused before any gradient is kept.
    with pytest.raises(NonFiniteError) as e:
        b.run_batch([BatchItem(a, _data(vocab, 1, q=-3e38), "importance_sampling")])
    assert e.value.status == 400 and e.value.detail["non_finite"] == "loss"
    with pytest.raises(NonFiniteError):  # a forward too: its loss:sum would be NaN on the wire
        b.run_batch([BatchItem(a, _data(vocab, 1, q=-3e38), "importance_sampling", forward_only=True)])
    b.optim_step(a, adam)  # nothing accumulated: a step on no gradient (AdamW may still decay: wd is 0 here)
    # 2. A NaN gradient (as a backward overflow would leave it): the step is refused and the gradient dropped.
    snap = _snapshot(b, a, tmp_path / "mid")
    b.run_batch([BatchItem(a, _data(vocab, 2))])
    poison(a)
    with pytest.raises(NonFiniteError) as e:
        b.optim_step(a, adam)
    assert "not applied" in str(e.value) and e.value.detail["non_finite"] == "gradient"
    # Bit-identical weights and optimizer state, and the poisoned gradient is gone (the mock saves it too).
    assert _snapshot(b, a, tmp_path / "after") == snap
    assert b.step_count(a) == step + 1
    # 3. The run is usable: the next pass and step train as usual.
    out = b.run_batch([BatchItem(a, _data(vocab, 0))])[0]
    assert np.isfinite(out.metrics["loss:sum"])
    metrics = b.optim_step(a, adam)
    assert np.isfinite(metrics["grad_norm:mean"]) and b.step_count(a) == step + 2
    assert _snapshot(b, a, tmp_path / "end") != snap
    b.remove_adapter(a)
