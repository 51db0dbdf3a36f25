"""Mock-backend specifics: gradients against finite differences, losses by hand, tokenizer, optimizer maths,
checkpoint layout, dropout, determinism by seed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from twinkle.model.base import BatchItem, SampleItem
from twinkle.model.mock import ByteTokenizer, MockBackend
from twinkle.types import (
    AdamParams,
    Datum,
    InvalidInputError,
    LoraConfig,
    ModelInput,
    OptimizerConfig,
    SamplingParams,
    TensorData,
    datum_from_tokens,
)

SMALL = {"embed_dim": 8, "hidden_dim": 16, "decays": (0.5, 0.9)}


def _rl_datum(rng: np.random.Generator, n: int = 7, k: int | None = None) -> Datum:
    tokens = rng.integers(0, 260, n).tolist()
    shape = (n,) if k is None else (n, k)
    return Datum(
        model_input=ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": rng.integers(0, 260, shape).astype(np.int64),
            "weights": rng.uniform(0.0, 1.0, shape).astype(np.float32),
            "logprobs": rng.uniform(-7.0, -4.0, shape).astype(np.float32),
            "advantages": rng.normal(size=shape).astype(np.float32),
        },
    )


def _backend_with_random_lora(dropout: float = 0.0) -> tuple[MockBackend, str]:
    b = MockBackend("mock://tiny", seed=3, **SMALL)
    b.add_adapter("a", LoraConfig(rank=3, seed=1, dropout=dropout))
    rng = np.random.default_rng(0)
    st = b._adapters["a"]
    for m, (a, bb) in st.lora.params.items():  # B = 0 would make every A-gradient zero
        st.lora.params[m] = (a, rng.normal(scale=0.3, size=bb.shape))
    return b, "a"


def _loss(b: MockBackend, items: list[BatchItem]) -> float:
    outs = b.run_batch([BatchItem(i.adapter, i.data, i.loss_fn, i.loss_fn_config, forward_only=True) for i in items])
    return sum(o.metrics["loss:sum"] for o in outs)


@pytest.mark.parametrize(
    "loss_fn,config,k",
    [
        ("cross_entropy", None, None),
        ("cross_entropy", None, 3),
        ("importance_sampling", None, None),
        ("ppo", {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}, None),
        ("dro", {"beta": 0.3}, None),
        ("dpo", {"beta": 0.5}, None),
    ],
)
def test_gradients_match_finite_differences(loss_fn: str, config: dict[str, float] | None, k: int | None) -> None:
    b, a = _backend_with_random_lora()
    rng = np.random.default_rng(1)
    data = [_rl_datum(rng, k=k) for _ in range(2)]
    if loss_fn in ("importance_sampling", "ppo"):
        # Put the ratios r = exp(lp - q) near 1 so that some fall inside and some outside the clip range.
        lps = [o["logprobs"].to_numpy() for o in b.run_batch([BatchItem(a, data, forward_only=True)])[0].loss_fn_outputs]
        for d, lp in zip(data, lps, strict=True):
            d.loss_fn_inputs["logprobs"] = TensorData.from_numpy(lp + rng.uniform(-0.6, 0.6, lp.shape), "float32")
    items = [BatchItem(a, data, loss_fn, config)]
    b.run_batch(items)
    st = b._adapters["a"]
    eps = 1e-6
    checked = 0
    for name, p in st.lora.flat().items():
        analytic = st.grads[name]
        for idx in list(zip(*[rng.integers(0, s, 4) for s in p.shape], strict=True)):
            old = p[idx]
            p[idx] = old + eps
            up = _loss(b, items)
            p[idx] = old - eps
            down = _loss(b, items)
            p[idx] = old
            numeric = (up - down) / (2 * eps)
            assert analytic[idx] == pytest.approx(numeric, rel=1e-4, abs=1e-6), (name, idx)
            checked += abs(numeric) > 1e-6
    assert checked > 0


def test_cispo_gradient_stops_at_the_ratio() -> None:
    """cispo's ratio is stop-gradient: its gradient equals cross_entropy's with weights clip(r)·A."""
    b, a = _backend_with_random_lora()
    rng = np.random.default_rng(4)
    data = [_rl_datum(rng) for _ in range(2)]
    lps = [o["logprobs"].to_numpy().astype(np.float64)
           for o in b.run_batch([BatchItem(a, data, forward_only=True)])[0].loss_fn_outputs]
    ce_data = []
    for d, lp in zip(data, lps, strict=True):
        d.loss_fn_inputs["logprobs"] = TensorData.from_numpy(lp + rng.uniform(-0.6, 0.6, lp.shape), "float32")
        q = d.loss_fn_inputs["logprobs"].to_numpy().astype(np.float64)
        adv = d.loss_fn_inputs["advantages"].to_numpy().astype(np.float64)
        w = np.clip(np.exp(lp - q), 0.8, 1.2) * adv
        ce_data.append(Datum(model_input=d.model_input,
                             loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"], "weights": w}))
    st = b._adapters[a]
    b.run_batch([BatchItem(a, data, "cispo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2})])
    cispo = {k: v.copy() for k, v in st.grads.items()}
    st.zero_grads()
    b.run_batch([BatchItem(a, ce_data, "cross_entropy")])
    for k, v in cispo.items():
        np.testing.assert_allclose(v, st.grads[k], rtol=1e-4, atol=1e-5)  # logprobs travel as float32


def test_losses_match_hand_computation() -> None:
    b = MockBackend(seed=1, **SMALL)
    b.add_adapter("a", LoraConfig(rank=2))
    rng = np.random.default_rng(2)
    d = _rl_datum(rng, n=6)
    inp = {k: v.to_numpy().astype(np.float64) for k, v in d.loss_fn_inputs.items()}
    w, q, adv = inp["weights"], inp["logprobs"], inp["advantages"]

    def run(loss: str, cfg: dict[str, float] | None = None) -> tuple[float, np.ndarray]:
        out = b.run_batch([BatchItem("a", [d], loss, cfg, forward_only=True)])[0]
        return out.metrics["loss:sum"], out.loss_fn_outputs[0]["logprobs"].to_numpy().astype(np.float64)

    loss, lp = run("cross_entropy")
    assert loss == pytest.approx(-(w * lp).sum(), rel=1e-5)
    r = np.exp(lp - q)
    assert run("importance_sampling")[0] == pytest.approx(-(r * adv).sum(), rel=1e-4)
    ppo = -np.minimum(r * adv, np.clip(r, 0.8, 1.2) * adv).sum()
    assert run("ppo")[0] == pytest.approx(ppo, rel=1e-4)
    cispo = -(np.clip(r, 0.1, 2.0) * lp * adv).sum()
    assert run("cispo", {"clip_low_threshold": 0.1, "clip_high_threshold": 2.0})[0] == pytest.approx(cispo, rel=1e-4)
    dro = -(lp * adv - 0.5 * 0.2 * (lp - q) ** 2).sum()
    assert run("dro", {"beta": 0.2})[0] == pytest.approx(dro, rel=1e-4)


def test_dpo_uses_base_model_reference_and_learns_preference() -> None:
    b = MockBackend(seed=0, **SMALL)
    b.add_adapter("a", LoraConfig(rank=4))
    b.set_optimizer("a", OptimizerConfig(lr=2e-2))
    chosen, rejected = datum_from_tokens(list(b"Hello there")), datum_from_tokens(list(b"Go away now"))
    out = b.run_batch([BatchItem("a", [chosen, rejected], "dpo", {"beta": 0.1})])[0]
    # A fresh adapter equals the reference: margin 0, loss log 2.
    assert out.metrics["loss:sum"] == pytest.approx(math.log(2.0), rel=1e-9)
    assert out.metrics["dpo_margin:mean"] == pytest.approx(0.0, abs=1e-12)
    b.optim_step("a")
    for _ in range(10):
        out = b.run_batch([BatchItem("a", [chosen, rejected], "dpo", {"beta": 0.1})])[0]
        b.optim_step("a")
    assert out.metrics["dpo_margin:mean"] > 0 and out.metrics["loss:sum"] < math.log(2.0)
    with pytest.raises(InvalidInputError) as e:
        b.run_batch([BatchItem("a", [chosen], "dpo")])
    assert e.value.field == "data"


def test_adamw_first_step_and_clipping_by_hand() -> None:
    b = MockBackend(seed=0, **SMALL)
    b.add_adapter("a", LoraConfig(rank=2, train_attn=False, train_mlp=False))
    st = b._adapters["a"]
    assert list(st.lora.params) == ["lm_head"]
    b.run_batch([BatchItem("a", [datum_from_tokens(list(b"abcdef"))])])
    g = st.grads["lm_head.B"].copy()
    p0 = st.lora.params["lm_head"][1].copy()
    norm = float(np.sqrt(sum((x * x).sum() for x in st.grads.values())))
    lr, wd, clip = 0.1, 0.01, norm / 4
    m = b.optim_step("a", AdamParams(learning_rate=lr, weight_decay=wd, grad_clip_norm=clip, eps=1e-8))
    assert m["grad_norm:mean"] == pytest.approx(norm)
    gc = g * clip / (norm + 1e-6)
    # Step 1 of AdamW: m̂ = g, v̂ = g², so the update is lr·g/(|g| + eps) after the decoupled decay.
    expected = p0 * (1 - lr * wd) - lr * gc / (np.abs(gc) + 1e-8)
    np.testing.assert_allclose(st.lora.params["lm_head"][1], expected, rtol=1e-9, atol=1e-12)
    assert all(not x.any() for x in st.grads.values())  # zeroed after the step


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_every_optimizer_lowers_the_loss(name: str) -> None:
    b = MockBackend(seed=0, **SMALL)
    b.add_adapter("a", LoraConfig(rank=4))
    lr = 2e-3 if name == "sgd" else 2e-2
    b.set_optimizer("a", OptimizerConfig(name=name, lr=lr, weight_decay=0.01, momentum=0.9 if name == "sgd" else 0.0))
    data = [datum_from_tokens(list(b"abcabcabc"))]
    losses = []
    for _ in range(15):
        losses.append(b.run_batch([BatchItem("a", data)])[0].metrics["loss:sum"])
        b.optim_step("a")
    assert losses[-1] < 0.7 * losses[0], losses


def test_target_modules_aliases_and_errors() -> None:
    b = MockBackend(**SMALL)
    b.add_adapter("q", LoraConfig(rank=2, target_modules=["q_proj", "v_proj"]))
    assert list(b._adapters["q"].lora.params) == ["ctx_proj"]
    b.add_adapter("all", LoraConfig(rank=2, target_modules="all-linear"))
    assert list(b._adapters["all"].lora.params) == ["ctx_proj", "mlp_proj", "lm_head"]
    with pytest.raises(InvalidInputError) as e:
        b.add_adapter("none", LoraConfig(rank=2, target_modules=["nothing_here"]))
    assert e.value.field == "target_modules"
    assert "none" not in b.list_adapters()


def test_deterministic_by_seed() -> None:
    def curve(seed: int) -> list[float]:
        b = MockBackend(seed=seed, **SMALL)
        b.add_adapter("a", LoraConfig(rank=2))
        b.set_optimizer("a", OptimizerConfig(lr=1e-2))
        out = []
        for _ in range(3):
            out.append(b.run_batch([BatchItem("a", [datum_from_tokens(list(b"twinkle twinkle"))])])[0].metrics["loss:sum"])
            b.optim_step("a")
        return out

    assert curve(0) == curve(0)
    assert curve(0) != curve(1)


def test_samples_change_with_training() -> None:
    b = MockBackend(seed=0)
    tok = b.tokenizer()
    b.add_adapter("a", LoraConfig(rank=8))
    b.set_optimizer("a", OptimizerConfig(lr=1e-2))
    msgs = [{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "I am Twinkle."}]
    data = [datum_from_tokens(tok.apply_chat_template(msgs))]
    prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True)
    params = SamplingParams(max_tokens=20, temperature=0.0)
    before = b.sample([SampleItem("a", prompt, 1, params)])[0].sequences[0]
    losses = []
    for _ in range(50):
        losses.append(b.run_batch([BatchItem("a", data)])[0].metrics["loss:sum"])
        b.optim_step("a")
    after = b.sample([SampleItem("a", prompt, 1, params)])[0].sequences[0]
    assert losses[-1] < 0.05 * losses[0]
    assert after.tokens != before.tokens
    assert tok.decode(after.tokens) == "I am Twinkle.<|im_end|>"
    assert after.stop_reason == "stop"  # <|im_end|> is EOS
    # The base model (adapter None) is untouched.
    assert b.sample([SampleItem(None, prompt, 1, params)])[0].sequences[0].tokens == before.tokens


def test_top_p_and_top_k_restrict_the_choice() -> None:
    b = MockBackend(seed=0)
    prompt = list(b"The quick")
    greedy = b.sample([SampleItem(None, prompt, 1, SamplingParams(max_tokens=6, temperature=0.0, stop=[]))])[0]
    narrow = b.sample([SampleItem(None, prompt, 4, SamplingParams(max_tokens=6, top_p=1e-6, seed=3, stop=[]))])[0]
    assert all(s.tokens == greedy.sequences[0].tokens for s in narrow.sequences)
    wide = b.sample([SampleItem(None, prompt, 40, SamplingParams(max_tokens=1, temperature=2.0, top_k=3, seed=3))])[0]
    last = b.net.forward(b.net.features([np.asarray(prompt)])[0], None)[-1]
    top3 = set(np.argsort(-last)[:3].tolist())
    first = {s.tokens[0] for s in wide.sequences}
    assert first <= top3 and len(first) > 1
    topk = b.sample([SampleItem(None, prompt, 1, SamplingParams(max_tokens=1, temperature=0.0, stop=[]),
                                topk_prompt_logprobs=3)])[0]
    assert topk.topk_prompt_logprobs is not None and topk.topk_prompt_logprobs[0] is None
    second = topk.topk_prompt_logprobs[1]
    assert len(second) == 3 and second[0][1] >= second[1][1] >= second[2][1]
    assert topk.prompt_logprobs is not None and topk.prompt_logprobs[1] <= second[0][1]


def test_tokenizer_roundtrip_and_chat_template() -> None:
    tok = ByteTokenizer()
    text = "héllo wörld ✨<|im_end|>"
    ids = tok.encode(text)
    assert ids[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "héllo wörld ✨"
    assert len(tok) == tok.vocab_size == 260
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert rendered == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                        "<|im_start|>assistant\nhello<|im_end|>\n")
    assert tok.apply_chat_template(msgs) == tok.encode(rendered)
    gen = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert gen.endswith("<|im_start|>assistant\n")
    out = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tok.decode(masked) == "hello<|im_end|>"
    with pytest.raises(InvalidInputError):
        tok.decode([999])


def test_checkpoint_layout_is_peft_like(tmp_path: Any) -> None:
    b = MockBackend(seed=0, **SMALL)
    b.add_adapter("a", LoraConfig(rank=3, alpha=6))
    b.save("a", tmp_path, optimizer=True)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 3 and cfg["lora_alpha"] == 6
    meta = json.loads((tmp_path / "twinkle_checkpoint.json").read_text())
    assert meta["backend"] == "mock" and meta["step"] == 0 and meta["lora"]["rank"] == 3
    assert (tmp_path / "training_state.npz").is_file()
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = safetensors_numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors["base_model.model.lm_head.lora_A.weight"].shape == (3, 16)
    assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (260, 3)
    b.save("a", tmp_path, optimizer=False)
    assert not (tmp_path / "training_state.npz").exists()


def test_fallback_safetensors_writer_is_readable(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from twinkle.model.mock import _safetensors

    real_import = builtins.__import__

    def no_safetensors(name: str, *args: Any, **kw: Any) -> Any:
        if name.startswith("safetensors"):
            raise ImportError(name)
        return real_import(name, *args, **kw)

    arrays = {"x": np.arange(6, dtype=np.float64).reshape(2, 3), "y": np.ones(4, dtype=np.float32)}
    monkeypatch.setattr(builtins, "__import__", no_safetensors)
    _safetensors.save_file(arrays, tmp_path / "t.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(builtins, "__import__", real_import)
    back = _safetensors.load_file(tmp_path / "t.safetensors")
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    other = safetensors_numpy.load_file(str(tmp_path / "t.safetensors"))
    np.testing.assert_array_equal(other["x"], arrays["x"])


def test_dropout_trains_and_resumes_exactly(tmp_path: Any) -> None:
    b, a = _backend_with_random_lora(dropout=0.3)
    b.set_optimizer(a, OptimizerConfig(lr=1e-2))
    data = [datum_from_tokens(list(b"dropout here"))]
    train = b.run_batch([BatchItem(a, data)])[0].metrics["loss:sum"]
    evaluated = b.run_batch([BatchItem(a, data, forward_only=True)])[0].metrics["loss:sum"]
    assert train != evaluated  # dropout is on while training only
    b.optim_step(a)
    b.save(a, tmp_path)
    nxt = [b.run_batch([BatchItem(a, data)])[0].metrics["loss:sum"] for _ in range(2)]
    b.load("r", tmp_path)
    again = [b.run_batch([BatchItem("r", data)])[0].metrics["loss:sum"] for _ in range(2)]
    assert nxt == again


def test_model_info_and_options(tmp_path: Any) -> None:
    b = MockBackend("mock://small", seed=0, vocab_size=300, max_length=64)
    info = b.model_info()
    assert info.backend == "mock" and info.vocab_size == 300 and info.max_length == 64
    assert b.tokenizer().eos_token_id in info.eos_token_ids
    assert info.num_parameters and info.num_parameters > 0
    assert MockBackend("Qwen/Qwen3-8B").model_info().model_name == "Qwen/Qwen3-8B"
    (Path(str(tmp_path)) / "file").write_text("x")
    b.add_adapter("a", LoraConfig(rank=2))
    with pytest.raises(InvalidInputError) as e:
        b.save("a", Path(str(tmp_path)) / "file")
    assert e.value.field == "path"
    with pytest.raises(InvalidInputError) as e:
        MockBackend("mock://huge")
    assert e.value.field == "model_id"
    with pytest.raises(InvalidInputError) as e:
        b.run_batch([BatchItem(None, [datum_from_tokens(list(range(80)))], forward_only=True)])
    assert e.value.field == "data[0].model_input"
