"""DPO through the native client on preference pairs built from the self-cognition answers.

The chosen answer names the model correctly, the rejected one does not; the ``dpo`` loss (see ``twinkle.loss``)
raises the chosen answer's likelihood relative to the rejected one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import twinkle_client
from twinkle.data import DataLoader, DPOPairPreprocessor, flatten_pairs, self_cognition_dataset
from twinkle.types import LoraConfig
from twinkle_client.model import TransformersModel
from twinkle_client.widgets import LiveCurve


@dataclass
class Config:
    base_url: str = os.environ.get("TWINKLE_SERVER_URL", "http://127.0.0.1:8000")
    api_key: str | None = os.environ.get("TWINKLE_API_KEY")
    model_id: str | None = os.environ.get("TWINKLE_MODEL")
    rank: int = 8
    lr: float = 1e-3
    beta: float = 0.1
    pairs_per_batch: int = 4
    steps: int = int(os.environ.get("TWINKLE_STEPS", "40"))
    seed: int = 0


def pairs() -> list[dict]:
    good = self_cognition_dataset("Twinkle", "the Twinkle team")
    bad = self_cognition_dataset("Bob", "a mysterious stranger")
    return [{"prompt": g["messages"][0]["content"], "chosen": g["messages"][1]["content"],
             "rejected": b["messages"][1]["content"]} for g, b in zip(good, bad, strict=True)]


def main(cfg: Config) -> None:
    with twinkle_client.init_twinkle_client(cfg.base_url, cfg.api_key):
        model = TransformersModel(model_id=cfg.model_id, seed=cfg.seed)
        model.add_adapter_to_model("dpo", LoraConfig(rank=cfg.rank))
        model.set_optimizer("AdamW", lr=cfg.lr)
        pre = DPOPairPreprocessor(model.get_tokenizer(), max_length=256)
        encoded = [pre(p) for p in pairs()]
        batches = DataLoader(encoded, batch_size=cfg.pairs_per_batch, shuffle=True, seed=cfg.seed).cycle()
        curve = LiveCurve(metrics=("loss", "margin"), title="DPO", total=cfg.steps)
        for _ in curve.range(cfg.steps):
            out = model.forward_backward(inputs=flatten_pairs(next(batches)), loss_fn="dpo",
                                         loss_fn_config={"beta": cfg.beta})
            model.clip_grad_and_step()
            m = model.calculate_metric()
            margin = out.metrics.get("margin:mean", out.metrics.get("reward_margin:mean"))
            curve.log({**m, **({"margin": margin} if margin is not None else {})}, run="dpo")
        print("saved:", model.save("dpo-final", save_optimizer=False))


if __name__ == "__main__":
    main(Config())
