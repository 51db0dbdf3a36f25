"""Every number a user sends is checked once, in the typed models: finite, in range, the right type."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from twinkle.types import (
    AdamParams,
    InvalidInputError,
    LoraConfig,
    LRSchedulerConfig,
    OptimizerConfig,
    SamplingParams,
    to_lora_config,
)
from twinkle.types.params import MAX_TOPK_LOGPROBS

INF, NAN = float("inf"), float("nan")

BAD = [
    (AdamParams, {"learning_rate": INF}, "learning_rate"),
    (AdamParams, {"learning_rate": "Infinity"}, "learning_rate"),
    (AdamParams, {"learning_rate": -1e-4}, "learning_rate"),
    (AdamParams, {"learning_rate": 1e300}, "learning_rate"),
    (AdamParams, {"learning_rate": "abc"}, "learning_rate"),
    (AdamParams, {"learning_rate": True}, "learning_rate"),
    (AdamParams, {"weight_decay": INF}, "weight_decay"),
    (AdamParams, {"weight_decay": -0.1}, "weight_decay"),
    (AdamParams, {"beta1": 2.0}, "beta1"),
    (AdamParams, {"beta2": 1.0}, "beta2"),
    (AdamParams, {"beta1": NAN}, "beta1"),
    (AdamParams, {"eps": 0.0}, "eps"),
    (AdamParams, {"eps": NAN}, "eps"),
    (AdamParams, {"grad_clip_norm": -1.0}, "grad_clip_norm"),
    (AdamParams, {"grad_clip_norm": INF}, "grad_clip_norm"),
    (OptimizerConfig, {"betas": [2.0, 0.5]}, "betas"),
    (OptimizerConfig, {"lr": NAN}, "lr"),
    (OptimizerConfig, {"momentum": 1.5}, "momentum"),
    (LoraConfig, {"alpha": NAN}, "alpha"),
    (LoraConfig, {"alpha": INF}, "alpha"),
    (LoraConfig, {"alpha": 0}, "alpha"),
    (LoraConfig, {"alpha": -8}, "alpha"),
    (LoraConfig, {"rank": 0}, "rank"),
    (LoraConfig, {"rank": 1.5}, "rank"),
    (LoraConfig, {"rank": "abc"}, "rank"),
    (LoraConfig, {"rank": True}, "rank"),
    (LoraConfig, {"rank": 10**9}, "rank"),
    (LoraConfig, {"dropout": 1.0}, "dropout"),
    (LoraConfig, {"seed": -1}, "seed"),
    (LoraConfig, {"seed": 2**64}, "seed"),
    (LRSchedulerConfig, {"warmup_steps": -1}, "warmup_steps"),
    (LRSchedulerConfig, {"min_lr_ratio": NAN}, "min_lr_ratio"),
    (SamplingParams, {"temperature": NAN}, "temperature"),
    (SamplingParams, {"temperature": INF}, "temperature"),
    (SamplingParams, {"temperature": -0.1}, "temperature"),
    (SamplingParams, {"top_p": 0.0}, "top_p"),
    (SamplingParams, {"top_p": 1.5}, "top_p"),
    (SamplingParams, {"top_p": NAN}, "top_p"),
    (SamplingParams, {"top_k": "x"}, "top_k"),
    (SamplingParams, {"top_k": -2}, "top_k"),
    (SamplingParams, {"top_k": 2.5}, "top_k"),
    (SamplingParams, {"max_tokens": -1}, "max_tokens"),
    (SamplingParams, {"max_tokens": "many"}, "max_tokens"),
    (SamplingParams, {"max_tokens": 1e12}, "max_tokens"),
    (SamplingParams, {"seed": -5}, "seed"),
    (SamplingParams, {"seed": "abc"}, "seed"),
]


@pytest.mark.parametrize("cls,kwargs,field", BAD, ids=[f"{c.__name__}-{f}-{i}" for i, (c, _, f) in enumerate(BAD)])
def test_bad_numbers_are_refused_naming_the_field(cls, kwargs, field) -> None:
    with pytest.raises(ValidationError) as e:
        cls(**kwargs)
    assert e.value.errors()[0]["loc"][0] == field


def test_good_values_and_tinker_defaults() -> None:
    a = AdamParams()
    assert (a.learning_rate, a.beta1, a.beta2, a.eps, a.weight_decay, a.grad_clip_norm) == (1e-4, 0.9, 0.95, 1e-12, 0, 0)
    assert AdamParams(learning_rate="0.001").learning_rate == 1e-3  # numbers as text (proto, query strings)
    assert LoraConfig(rank="8", alpha=16).lora_alpha == 16.0 and LoraConfig().lora_alpha == 32.0
    s = SamplingParams(max_tokens=4.0, top_k=0, seed=2**63 - 1)
    assert s.max_tokens == 4 and s.top_k == 0
    assert OptimizerConfig(betas=(0.0, 0.999)).betas == (0.0, 0.999)


def test_topk_prompt_logprobs_bounded() -> None:
    from twinkle.types.api import SampleRequest

    prompt = {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}
    assert SampleRequest(prompt=prompt, topk_prompt_logprobs=MAX_TOPK_LOGPROBS).topk_prompt_logprobs == MAX_TOPK_LOGPROBS
    for bad in (10**9, -1, "x", 1.5, True):
        with pytest.raises(ValidationError) as e:
            SampleRequest(prompt=prompt, topk_prompt_logprobs=bad)
        assert e.value.errors()[0]["loc"][0] == "topk_prompt_logprobs"


@pytest.mark.parametrize("ttl", [1e300, float("inf"), float("nan"), 0, -5, True, "x", 10 * 365 * 86400 + 1])
def test_checkpoint_ttl_is_bounded(ttl) -> None:
    """Issue 12 item 4: a huge TTL made every checkpoint listing of its user a 500; now it is refused up front."""
    from twinkle.server.ops import SaveOp
    from twinkle.types import InvalidInputError
    from twinkle.types.api import SaveCheckpointRequest

    with pytest.raises(InvalidInputError) as e:
        SaveOp(name="c", ttl_seconds=ttl)
    assert e.value.field == "ttl_seconds"
    with pytest.raises(ValidationError) as v:
        SaveCheckpointRequest(name="c", ttl_seconds=ttl)
    assert v.value.errors()[0]["loc"][0] == "ttl_seconds"


def test_checkpoint_ttl_accepts_sane_values() -> None:
    from twinkle.server.ops import SaveOp

    assert SaveOp(name="c", ttl_seconds=3600).ttl_seconds == 3600.0
    assert SaveOp(name="c").ttl_seconds is None


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


def test_lora_keywords_take_effect_in_either_spelling():
    """``add_adapter_to_model("x", r=8)`` made a rank-32 adapter until session 10 (the keyword was applied after
    the peft spellings were translated, and LoraConfig ignores unknown keys): every bench "rank-8 adapter" of the
    native client was rank 32."""
    assert to_lora_config(None, r=8).rank == 8
    assert to_lora_config({"rank": 4}, r=8).rank == 8  # a keyword overrides the config
    cfg = to_lora_config(None, r=16, lora_alpha=8, lora_dropout=0.1)
    assert (cfg.rank, cfg.alpha, cfg.dropout) == (16, 8, 0.1)
    assert to_lora_config({"r": 4, "rank": 6}).rank == 6  # within a config, the canonical key wins
    with pytest.raises(InvalidInputError, match="'rnak'") as ei:
        to_lora_config(None, rnak=8)
    assert ei.value.field == "rnak"
    with pytest.raises(InvalidInputError, match="rank") as ei:
        to_lora_config({"r": 0})
    assert ei.value.field == "config"


def test_local_and_remote_models_read_lora_configs_the_same_way(tmp_path):
    """One reader for both: the local model used to ignore a misspelt keyword (``rnak=8`` made rank 32)."""
    import twinkle.model.local as local
    import twinkle_client.model as remote
    from twinkle.model import MockModel

    assert local.to_lora_config is remote.to_lora_config is to_lora_config
    with pytest.raises(InvalidInputError, match="'rnak'"):
        MockModel(seed=0, output_dir=tmp_path).add_adapter_to_model("default", rnak=8)
