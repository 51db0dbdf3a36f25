"""Megatron backend parity with the transformers backend on the same weights (fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from twinkle.model.base import BatchItem, SampleItem  # noqa: E402
from twinkle.types import AdamParams, LoraConfig, SamplingParams, datum_from_tokens  # noqa: E402


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    from twinkle.model.megatron import MegatronBackend
    from twinkle.model.transformers import TransformersBackend
    from twinkle.model.transformers._random import build_random_model

    path = build_random_model(tmp_path_factory.mktemp("mgb") / "m", vocab_size=300)
    return TransformersBackend(str(path)), MegatronBackend(str(path))


def _batch(seed: int, n: int = 4, length: int = 16):
    rng = np.random.default_rng(seed)
    return [datum_from_tokens(rng.integers(0, 300, length).tolist()) for _ in range(n)]


def test_base_prompt_logprobs_match(backends):
    hf, mg = backends
    prompt = np.random.default_rng(1).integers(0, 300, 24).tolist()
    items = [SampleItem(None, prompt, 1, SamplingParams(max_tokens=1, temperature=0.0), prompt_logprobs=True)]
    a = hf.sample(items)[0].prompt_logprobs
    b = mg.sample(items)[0].prompt_logprobs
    assert a[0] is None and b[0] is None
    np.testing.assert_allclose(np.array(a[1:]), np.array(b[1:]), atol=1e-4)


def test_twenty_lora_steps_same_loss_curve(backends):
    hf, mg = backends
    cfg = LoraConfig(rank=4, seed=7)
    curves = []
    for b in (hf, mg):
        b.add_adapter("curve", cfg)
        losses = []
        for step in range(20):
            out = b.run_batch([BatchItem("curve", _batch(step % 3))])
            losses.append(out[0].metrics["loss:sum"] / 60.0)  # per token
            b.optim_step("curve", AdamParams(learning_rate=2e-3, eps=1e-8))
        curves.append(np.array(losses))
    assert curves[0][-1] < curves[0][0]  # it learns
    np.testing.assert_allclose(curves[0], curves[1], atol=1e-3)


def test_mixed_adapters_in_one_batch_match_separate(backends):
    _, mg = backends
    for name, seed in (("m1", 1), ("m2", 2)):
        mg.add_adapter(name, LoraConfig(rank=2, seed=seed))
        mg.run_batch([BatchItem(name, _batch(seed))])
        mg.optim_step(name, AdamParams(learning_rate=1e-2, eps=1e-8))
    d1, d2 = _batch(11, 2), _batch(12, 3)
    mixed = mg.run_batch([BatchItem("m1", d1, forward_only=True), BatchItem("m2", d2, forward_only=True)])
    sep1 = mg.run_batch([BatchItem("m1", d1, forward_only=True)])[0]
    sep2 = mg.run_batch([BatchItem("m2", d2, forward_only=True)])[0]
    assert mixed[0].metrics["loss:sum"] == pytest.approx(sep1.metrics["loss:sum"], abs=1e-4)
    assert mixed[1].metrics["loss:sum"] == pytest.approx(sep2.metrics["loss:sum"], abs=1e-4)
    assert mixed[0].metrics["loss:sum"] != pytest.approx(mixed[1].metrics["loss:sum"], abs=1e-3)


def test_export_loads_in_transformers_backend_and_peft(backends, tmp_path):
    hf, mg = backends
    mg.add_adapter("exp", LoraConfig(rank=4, seed=5))
    for step in range(3):
        mg.run_batch([BatchItem("exp", _batch(step))])
        mg.optim_step("exp", AdamParams(learning_rate=1e-2, eps=1e-8))
    mg.save("exp", tmp_path / "ck", optimizer=True)
    hf.load("from_mg", tmp_path / "ck", optimizer=False)
    data = _batch(99, 3)
    a = mg.run_batch([BatchItem("exp", data, forward_only=True)])[0]
    b = hf.run_batch([BatchItem("from_mg", data, forward_only=True)])[0]
    for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(x["logprobs"].to_numpy(), y["logprobs"].to_numpy(), atol=1e-4)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(hf.path), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "ck")).eval()
    ids = torch.tensor([data[0].model_input.to_ints()])
    tgt = torch.tensor(data[0].loss_fn_inputs["target_tokens"].tolist())
    with torch.no_grad():
        lp = torch.log_softmax(peft_model(ids).logits[0].float(), -1).gather(-1, tgt[:, None]).squeeze(-1)
    np.testing.assert_allclose(lp.numpy(), a.loss_fn_outputs[0]["logprobs"].to_numpy(), atol=1e-4)


def test_resume_reproduces_next_loss(backends, tmp_path):
    _, mg = backends
    mg.add_adapter("res", LoraConfig(rank=4, seed=2))
    for step in range(2):
        mg.run_batch([BatchItem("res", _batch(step))])
        mg.optim_step("res", AdamParams(learning_rate=1e-2, eps=1e-8))
    mg.save("res", tmp_path / "st", optimizer=True)
    mg.load("res2", tmp_path / "st", optimizer=True)
    outs = []
    for name in ("res", "res2"):
        mg.run_batch([BatchItem(name, _batch(5))])
        mg.optim_step(name, AdamParams(learning_rate=1e-2, eps=1e-8))
        outs.append(mg.run_batch([BatchItem(name, _batch(6), forward_only=True)])[0].metrics["loss:sum"])
    assert outs[0] == pytest.approx(outs[1], abs=1e-6)


def test_greedy_sampling_matches_transformers(backends):
    hf, mg = backends
    items = [SampleItem(None, [5, 6, 7], 1, SamplingParams(max_tokens=6, temperature=0.0)),
             SampleItem(None, [9, 10, 11, 12, 13], 2, SamplingParams(max_tokens=4, temperature=0.0))]
    a, b = hf.sample(items), mg.sample(items)
    for x, y in zip(a, b, strict=True):
        assert [s.tokens for s in x.sequences] == [s.tokens for s in y.sequences]
        np.testing.assert_allclose(x.sequences[0].logprobs, y.sequences[0].logprobs, atol=1e-4)


def test_no_sampling_thread_beside_training(backends):
    """The transformers backend routes LoRA rows per thread when asked; megatron declines (its ranks' collectives
    run in one order). It used to inherit the transformers answer and fail on its own routing slot."""
    hf, mg = backends
    assert mg.concurrent_sampling() is False
    assert mg._routing.per_thread is False


def test_images_are_refused_before_any_compute(backends):
    """The megatron backend has no vision tower: its model info says so (the gateway's image check refuses image
    rows with a 400 naming the model before they are queued), and an image that reaches the backend anyway is
    refused before a forward pass, for training and for sampling."""
    import base64
    import io

    from PIL import Image

    from twinkle.model.images import resolve_model_input
    from twinkle.types import Datum, EncodedTextChunk, ImageChunk, InvalidInputError, ModelInput

    _, mg = backends
    info = mg.model_info()
    assert info.vision is None
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(buf, format="PNG")
    chunk = ImageChunk(data=base64.b64encode(buf.getvalue()).decode(), format="png", expected_tokens=4)
    mi = ModelInput(chunks=[EncodedTextChunk(tokens=[5, 6]), chunk, EncodedTextChunk(tokens=[7])])
    with pytest.raises(InvalidInputError) as e:
        resolve_model_input(mi, info, "data[0].model_input")
    assert "text-only" in str(e.value) and e.value.field.startswith("data[0].model_input.chunks[1]")

    mg.add_adapter("img", LoraConfig(rank=2, seed=3))
    calls: list[int] = []
    real = mg._forward_logits
    mg._forward_logits = lambda *a, **k: (calls.append(1), real(*a, **k))[1]  # type: ignore[method-assign]
    try:
        datum = Datum(model_input=mi, loss_fn_inputs={"target_tokens": np.zeros(7, dtype=np.int64)})
        with pytest.raises(InvalidInputError) as e:
            mg.run_batch([BatchItem("img", [datum])])
        assert "image" in str(e.value), str(e.value)
        with pytest.raises(InvalidInputError) as e:
            mg.sample([SampleItem("img", [5, 6, 7], 1, SamplingParams(max_tokens=2), images=[chunk])])
        assert "text-only" in str(e.value)
    finally:
        del mg._forward_logits
        mg.remove_adapter("img")
    assert calls == []
