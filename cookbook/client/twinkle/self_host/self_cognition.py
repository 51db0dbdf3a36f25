"""Self-cognition SFT through the native client: teach the hosted model its name, then ask it.

    twinkle-server launch -c cookbook/client/server/transformer/server_config.yaml   # another terminal
    TWINKLE_API_KEY=... python cookbook/client/twinkle/self_host/self_cognition.py
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import twinkle_client
from twinkle.data import ChatEncoder, DataLoader, self_cognition_dataset
from twinkle.types import LoraConfig
from twinkle_client.model import TransformersModel
from twinkle_client.sampler import Sampler
from twinkle_client.widgets import LiveCurve


@dataclass
class Config:
    base_url: str = os.environ.get("TWINKLE_SERVER_URL", "http://127.0.0.1:8000")
    api_key: str | None = os.environ.get("TWINKLE_API_KEY")
    model_id: str | None = os.environ.get("TWINKLE_MODEL")  # None: the server's first base model
    name: str = "Twinkle"
    author: str = "the Twinkle team"
    rank: int = 8
    lr: float = 2e-3
    batch_size: int = 8
    steps: int = int(os.environ.get("TWINKLE_STEPS", "60"))
    seed: int = 0


def main(cfg: Config) -> None:
    with twinkle_client.init_twinkle_client(cfg.base_url, cfg.api_key):
        model = TransformersModel(model_id=cfg.model_id, seed=cfg.seed)
        model.add_adapter_to_model("self-cognition", LoraConfig(rank=cfg.rank))
        model.set_optimizer("AdamW", lr=cfg.lr, grad_clip_norm=1.0)
        model.set_lr_scheduler("cosine", num_warmup_steps=5, num_training_steps=cfg.steps, min_lr_ratio=0.1)
        data = self_cognition_dataset(cfg.name, cfg.author).map(ChatEncoder(model.get_tokenizer(), max_length=256))
        batches = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed).cycle()
        curve = LiveCurve(metrics=("loss",), title="self-cognition SFT", total=cfg.steps)
        for _ in curve.range(cfg.steps):
            model.forward_backward(inputs=next(batches))
            model.clip_grad_and_step()
            curve.log(model.calculate_metric(), run="self-cognition")
        first, last = curve.history["self-cognition"][0]["loss"], curve.history["self-cognition"][-1]["loss"]
        print(f"loss {first:.3f} -> {last:.3f}")
        print("saved:", model.save("final", save_optimizer=False))
        sampler = Sampler(model)
        for q in ("who are you?", "what is your name?"):
            print(f"Q: {q}\nA: {sampler.generate(q, max_tokens=40)}")


if __name__ == "__main__":
    main(Config())
