"""The architecture families users bring, each a tiny random model built offline (``_families``), through one
contract: a mixed two-adapter batch gives the same gradients as separate passes, packed or padded; forward logprobs equal
forward_backward logprobs; a saved adapter loads with ``PeftModel.from_pretrained`` and gives the same
logits; greedy sampling equals HF ``generate`` of the merged model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.live_lora import add_live_adapters
from twinkle.model.base import BatchItem, SampleItem
from twinkle.model.transformers import TransformersBackend
from twinkle.model.transformers._families import FAMILIES, build_family
from twinkle.types import Datum, LoraConfig, ModelInput, SamplingParams

ROWS = [[5, 17, 42, 99, 7, 3, 11], [8, 9, 10, 11, 12], [30, 31, 32, 33, 34, 35]]
PROMPT = [5, 17, 42, 99]


def _datum(row: list[int]) -> Datum:
    return Datum(model_input=ModelInput.from_ints(row[:-1]),
                 loss_fn_inputs={"target_tokens": np.asarray(row[1:]), "weights": np.ones(len(row) - 1, np.float32)})


def _grads(b: TransformersBackend, name: str) -> list[torch.Tensor]:
    return [p.grad.clone() for p in b._adapters[name].parameters()]


def _zero(b: TransformersBackend) -> None:
    for st in b._adapters.values():
        for p in st.parameters():
            p.grad = None


FAST = ("qwen3", "gemma2")  # the rest run in the full (slow) tier
PARAMS = [pytest.param(f, marks=() if f in FAST else pytest.mark.slow) for f in FAMILIES]


@pytest.mark.parametrize("family", PARAMS)
def test_family_contract(family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    path = build_family(family, tmp_path / family)
    b = TransformersBackend(str(path), device="cpu")
    add_live_adapters(b, ("a", "b"), seed=10, scale=0.3)

    # two adapters in one mixed batch == separate passes
    da, db = [_datum(r) for r in ROWS[:2]], [_datum(ROWS[2])]
    b.run_batch([BatchItem("a", da), BatchItem("b", db)])
    mixed_a, mixed_b = _grads(b, "a"), _grads(b, "b")
    _zero(b)
    b.run_batch([BatchItem("a", da)])
    sep_a = _grads(b, "a")
    _zero(b)
    b.run_batch([BatchItem("b", db)])
    sep_b = _grads(b, "b")
    _zero(b)
    for x, y in zip(mixed_a + mixed_b, sep_a + sep_b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    assert any(float(x.abs().sum()) > 0 for x in mixed_a)

    # packed rows (several datums of one adapter share a row) == one datum per row, and packing is on here
    short = [_datum(r) for r in (ROWS[1][:3], ROWS[2][:4], ROWS[0][:3])]
    group = [_datum(ROWS[0] + [8, 9, 10] + tail) for tail in ([12, 13], [14], [15, 16, 17])]  # shared prefix
    items = [BatchItem("a", da + short + group), BatchItem("b", db + short[:2])]
    runs = []
    for packing in (True, False):
        b.packing = packing
        out = b.run_batch(items)
        runs.append(([o["logprobs"].to_numpy() for r in out for o in r.loss_fn_outputs], _grads(b, "a") + _grads(b, "b")))
        _zero(b)
    b.packing = True
    assert b._pack_ok is True and b._share_ok is not None
    for x, y in zip(runs[0][0], runs[1][0], strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)
    for x, y in zip(runs[0][1], runs[1][1], strict=True):  # float32 summation order differs: scale-relative
        assert float((x - y).abs().max()) <= 2e-5 * float(y.abs().max()) + 1e-7

    # forward logprobs == forward_backward logprobs
    fwd = b.run_batch([BatchItem("a", da, forward_only=True)])[0]
    fb = b.run_batch([BatchItem("a", da)])[0]
    _zero(b)
    for x, y in zip(fwd.loss_fn_outputs, fb.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(x["logprobs"].to_numpy(), y["logprobs"].to_numpy(), atol=1e-5)

    # the saved adapter in peft: same logits; merged model's greedy generate == our greedy sampling
    b.save("a", tmp_path / "ck", optimizer=False)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                              attn_implementation=b.model.config._attn_implementation).eval()
    pm = PeftModel.from_pretrained(hf, str(tmp_path / "ck")).eval()
    row = ROWS[0]
    with torch.no_grad():
        logits = pm(input_ids=torch.tensor([row[:-1]])).logits[0].float()
    peft_lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(row[1:])[:, None]).squeeze(-1).numpy()
    np.testing.assert_allclose(fwd.loss_fn_outputs[0]["logprobs"].to_numpy(), peft_lp, atol=1e-4)
    merged = pm.merge_and_unload()
    with torch.no_grad():
        gen = merged.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    ours = b.sample([SampleItem("a", PROMPT, 1, SamplingParams(max_tokens=6, temperature=0.0, stop=[]))])[0]
    assert ours.sequences[0].tokens == gen
    b.close()


@pytest.mark.parametrize("family", ["gemma2", "phi3", "olmo2", "qwen3_moe"])
def test_megatron_refuses_unsupported_families_by_name(family):
    convert = pytest.importorskip("twinkle.model.megatron.convert")
    from twinkle.model.transformers._families import _config
    from twinkle.types import TwinkleError

    cfg = _config(family, 512, 2, 0)
    if cfg.model_type in convert.SUPPORTED:
        pytest.skip(f"megatron converts {family}")
    with pytest.raises(TwinkleError) as e:
        convert.geometry(cfg)
    assert repr(cfg.model_type) in str(e.value) and e.value.field == "model_id"


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    torch.set_num_threads(1)
    path = build_family("qwen3", tmp_path / "m")
    grads = []
    for ckpt in (False, True):
        b = TransformersBackend(str(path), device="cpu", gradient_checkpointing=ckpt, autocast="bfloat16")
        assert b.autocast is None  # CPU: ignored, float32 stays exact
        b.add_adapter("a", LoraConfig(rank=4, seed=0, dropout=0.1))
        b.add_adapter("ref", LoraConfig(rank=4, seed=1))
        with torch.no_grad():
            for pair in b._adapters["a"].pairs.values():
                pair.lora_B.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
        calls = []
        layer = b.model.model.layers[0]
        if ckpt:
            inner = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = lambda *a, _c=calls, _f=inner, **k: (_c.append(1), _f(*a, **k))[1]
        torch.manual_seed(0)
        b.run_batch([BatchItem("a", [_datum(r) for r in ROWS[:2]]), BatchItem("ref", [_datum(ROWS[2])])])
        assert len(calls) == (1 if ckpt else 0)  # the layer ran under torch.utils.checkpoint
        grads.append(_grads(b, "a") + _grads(b, "ref"))
        if ckpt:
            assert b._ckpt_layers and not any(m.training for m in b._ckpt_layers)
        b.close()
    for x, y in zip(*grads, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_megatron_refuses_vision_language_models_by_name():
    """Images on megatron: a vision-language checkpoint (the family of builtin://tiny-vl) is refused at load with
    its family named, so no image row can ever reach a megatron replica (text models refuse images per request)."""
    convert = pytest.importorskip("twinkle.model.megatron.convert")
    from transformers import Qwen3VLConfig

    from twinkle.types import TwinkleError

    cfg = Qwen3VLConfig()
    with pytest.raises(TwinkleError) as e:
        convert.geometry(cfg)
    assert "'qwen3_vl'" in str(e.value) and e.value.field == "model_id"
