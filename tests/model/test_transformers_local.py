"""The local API (docs/local-api.md): TransformersModel + Sampler train and sample without a server."""

from __future__ import annotations

import math

import pytest
import torch

from twinkle.model import MockModel, TransformersModel
from twinkle.model.transformers._random import tiny_model_path
from twinkle.sampler import Sampler
from twinkle.types import InvalidInputError, LoraConfig, SamplingParams


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.set_num_threads(1)
    m = TransformersModel(str(tiny_model_path()), seed=0, device="cpu", output_dir=tmp_path_factory.mktemp("out"))
    yield m
    m.close()


def _batch(tok):
    texts = ["I am Twinkle, a helpful model.", "My name is Twinkle and I train adapters."]
    out = []
    for t in texts:
        ids = tok.encode(t)
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


def test_local_training_loss_falls_then_save_load_and_sample(model):
    from peft import LoraConfig as PeftLoraConfig

    model.add_adapter_to_model("default", PeftLoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    assert model.current_adapter == "default" and model.backend.adapter_config("default").rank == 8
    model.set_optimizer("AdamW", lr=1e-2, grad_clip_norm=1.0)
    model.set_lr_scheduler("cosine", num_warmup_steps=2, num_training_steps=30, min_lr_ratio=0.1)
    batch = _batch(model.get_tokenizer())
    losses = []
    for _ in range(30):
        out = model.forward_backward(inputs=batch)
        assert len(out.loss_fn_outputs) == 2
        step = model.clip_grad_and_step()
        m = model.calculate_metric(is_training=True)
        losses.append(m["loss"])
    assert set(m) >= {"loss", "tokens", "step", "lr", "grad_norm"} and m["step"] == 30 == step["step"]
    assert losses[-1] < 0.5 * losses[0], losses
    ev = model.forward(inputs=batch)
    ev_loss = model.calculate_metric(is_training=False)["loss"]
    assert math.isfinite(ev_loss) and ev.metrics["loss:sum"] > 0

    sampler = Sampler(model)
    tok = model.get_tokenizer()
    prompt = batch[0]["input_ids"][:4]
    resp = sampler.sample(prompt, SamplingParams(max_tokens=6, temperature=0.0, stop=[]))
    # the adapter learned the text: greedy continuation reproduces the training sequence
    assert resp.sequences[0].tokens[:3] == batch[0]["input_ids"][4:7]
    lps = sampler.compute_logprobs(batch[0]["input_ids"])
    assert lps[0] is None and len(lps) == len(batch[0]["input_ids"])
    assert isinstance(sampler.generate("who are you?", max_tokens=5), str)

    path = model.save("step-30")
    model.save("final", save_optimizer=False)
    model.forward_backward(inputs=batch)
    model.clip_grad_and_step()
    model.load("step-30")
    assert model.backend.step_count("default") == 30
    assert sampler.sample(prompt, SamplingParams(max_tokens=6, temperature=0.0, stop=[])).sequences[0].tokens == \
        resp.sequences[0].tokens
    assert path.endswith("step-30") and tok is not None


def test_local_errors(model):
    # self-contained (it may run alone, or on another xdist worker than the training test)
    if "errs" not in model.backend.list_adapters():
        model.add_adapter_to_model("errs", {"r": 4})
    before, model.current_adapter = model.current_adapter, "errs"
    with pytest.raises(InvalidInputError) as e:
        model.set_optimizer("Lion")
    assert e.value.field == "optimizer"
    with pytest.raises(InvalidInputError) as e:
        model.forward_backward(inputs=[])
    assert e.value.field == "inputs"
    with pytest.raises(InvalidInputError):
        model.add_adapter_to_model("x", {"r": 0})
    model.current_adapter = before


def test_mock_model_has_the_same_methods(tmp_path):
    mm = MockModel(seed=0, output_dir=tmp_path)
    mm.add_adapter_to_model("default", LoraConfig(rank=4))
    mm.set_optimizer("AdamW", lr=1e-2)
    tok = mm.get_tokenizer()
    ids = tok.encode("hello twinkle")
    for _ in range(3):
        mm.forward_backward(inputs=[{"input_ids": ids}])
        mm.clip_grad_and_step()
    assert mm.calculate_metric()["step"] == 3
    assert Sampler(mm).sample(ids[:3], SamplingParams(max_tokens=3, temperature=0.0)).sequences


def test_importing_model_and_sampler_packages_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, twinkle.model, twinkle.sampler; twinkle.model.MockModel; twinkle.sampler.Sampler; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
