"""Checkpoints: peft format (PeftModel.from_pretrained gives the engine's logprobs) and exact full-state resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from twinkle.model.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINT_META, BatchItem
from twinkle.model.transformers import TransformersBackend
from twinkle.model.transformers._random import tiny_model_path
from twinkle.types import LoraConfig, LRSchedulerConfig, NotFoundError, OptimizerConfig, datum_from_tokens


@pytest.fixture(scope="module")
def backend():
    torch.set_num_threads(1)
    b = TransformersBackend(str(tiny_model_path()), device="cpu")
    yield b
    b.close()


def _data(n, seed):
    rng = np.random.default_rng(seed)
    return [datum_from_tokens(rng.integers(0, 300, size=10 + int(rng.integers(0, 6))).tolist()) for _ in range(n)]


def _train(backend, name, data, steps):
    losses = []
    for _ in range(steps):
        losses.append(backend.run_batch([BatchItem(name, data)])[0].metrics["loss:sum"])
        backend.optim_step(name)
    return losses


def test_peft_checkpoint_loads_with_peft(backend, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    backend.add_adapter("p", LoraConfig(rank=4, alpha=16, seed=3))
    backend.set_optimizer("p", OptimizerConfig(lr=5e-3))
    data = _data(3, seed=1)
    _train(backend, "p", data, 3)
    backend.save("p", tmp_path / "ck", optimizer=False)
    cfg = json.loads((tmp_path / "ck" / ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16 and cfg["peft_type"] == "LORA"
    assert (tmp_path / "ck" / ADAPTER_WEIGHTS).is_file() and (tmp_path / "ck" / CHECKPOINT_META).is_file()
    assert not (tmp_path / "ck" / "training_state.pt").exists()

    ours = backend.run_batch([BatchItem("p", data, forward_only=True)])[0]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_path()), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "ck"))
    peft_model.eval()
    n_lora = sum(1 for n, _ in peft_model.named_parameters() if "lora_A" in n)
    assert n_lora == len(backend._adapters["p"].modules)
    for d, out in zip(data, ours.loss_fn_outputs, strict=True):
        with torch.no_grad():
            logits = peft_model(input_ids=torch.tensor([d.model_input.to_ints()])).logits[0].float()
        tgt = torch.tensor(d.loss_fn_inputs["target_tokens"].data)
        want = torch.log_softmax(logits, -1).gather(-1, tgt[:, None]).squeeze(-1).numpy()
        got = out["logprobs"].to_numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
    base_only = backend.run_batch([BatchItem(None, data, forward_only=True)])[0].loss_fn_outputs[0]["logprobs"].to_numpy()
    assert np.abs(base_only - ours.loss_fn_outputs[0]["logprobs"].to_numpy()).max() > 1e-4  # the adapter matters
    backend.remove_adapter("p")


def test_full_state_resume_is_exact(backend, tmp_path):
    backend.add_adapter("r", LoraConfig(rank=4, seed=1, dropout=0.1))
    backend.set_optimizer("r", OptimizerConfig(lr=1e-2, weight_decay=0.01, grad_clip_norm=1.0))
    backend.set_lr_scheduler("r", LRSchedulerConfig(name="cosine", warmup_steps=1, total_steps=10))
    data = _data(3, seed=2)
    _train(backend, "r", data, 3)
    backend.save("r", tmp_path / "s3")
    after = _train(backend, "r", data, 2)  # losses of steps 4 and 5 (dropout draws RNG)
    backend.remove_adapter("r")

    cfg = backend.load("r2", tmp_path / "s3")
    assert cfg.rank == 4 and cfg.dropout == 0.1
    assert backend.step_count("r2") == 3
    again = _train(backend, "r2", data, 2)
    assert again == pytest.approx(after, abs=1e-6)

    # loading over an existing adapter replaces it; a weights-only load keeps a fresh optimizer
    backend.load("r2", tmp_path / "s3", optimizer=False)
    assert backend.adapter_config("r2").rank == 4
    with pytest.raises(NotFoundError) as e:
        backend.load("r3", tmp_path / "missing")
    assert e.value.field == "path"
    assert "r3" not in backend.list_adapters()
    backend.remove_adapter("r2")
