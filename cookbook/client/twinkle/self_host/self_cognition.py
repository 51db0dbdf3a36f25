"""Self-cognition SFT through the native client: teach the hosted model its name, then ask it.

    twinkle-server launch -c cookbook/client/server/transformer/server_config.yaml   # another terminal
    TWINKLE_API_KEY=... python cookbook/client/twinkle/self_host/self_cognition.py --steps=100

The settings are the quickstart's (rank 32, alpha 64, lr 2e-3 with a cosine schedule, batch 16): on the
builtin toy model the greedy answer to "who are you?" names the model after about 100 steps. Ends with a
``RESULT {json}`` line (losses, the answers before and after, the saved checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
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
    api_key: str = os.environ.get("TWINKLE_API_KEY", "")
    base_model: str = os.environ.get("TWINKLE_BASE_MODEL") or os.environ.get("TWINKLE_MODEL") or "builtin://tiny"
    name: str = "Twinkle"
    author: str = "the Twinkle team"
    lora_rank: int = 32
    lr: float = 2e-3
    batch_size: int = 16
    steps: int = int(os.environ.get("TWINKLE_STEPS", "100"))
    question: str = "who are you?"
    seed: int = 0


def parse_args(cfg: Config, argv: list[str]) -> Config:
    """``--name=value`` flags override the defaults above."""
    for arg in argv:
        key, _, value = arg.lstrip("-").partition("=")
        field = key.replace("-", "_")
        cfg = dataclasses.replace(cfg, **{field: type(getattr(cfg, field))(value)})
    return cfg


def main(cfg: Config) -> dict:
    with twinkle_client.init_twinkle_client(cfg.base_url, cfg.api_key or None):
        model = TransformersModel(cfg.base_model, seed=cfg.seed)
        model.add_adapter_to_model("self-cognition", LoraConfig(rank=cfg.lora_rank, alpha=2.0 * cfg.lora_rank,
                                                                seed=cfg.seed))
        model.set_optimizer("AdamW", lr=cfg.lr, grad_clip_norm=1.0)
        model.set_lr_scheduler("cosine", num_warmup_steps=3, num_training_steps=cfg.steps, min_lr_ratio=0.1)
        sampler = Sampler(model)
        before = sampler.generate(cfg.question, max_tokens=32)
        print(f"before: {cfg.question} -> {before!r}")

        data = self_cognition_dataset(cfg.name, cfg.author).map(ChatEncoder(model.get_tokenizer()))
        batches = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed).cycle()
        curve = LiveCurve(metrics=("loss",), title="self-cognition SFT", total=cfg.steps)
        losses = []
        for _ in curve.range(cfg.steps):
            model.forward_backward(inputs=next(batches))
            model.clip_grad_and_step()
            metrics = model.calculate_metric()
            losses.append(float(metrics["loss"]))
            curve.log(metrics, run="self-cognition")
        curve.close()

        after = sampler.generate(cfg.question, max_tokens=32)
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}\nafter:  {cfg.question} -> {after!r}")
        path = model.save("self-cognition", save_optimizer=False)
        print(f"saved {path}")
    result = {"first_loss": losses[0], "last_loss": losses[-1], "losses": losses, "before": before,
              "after": after, "path": path}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(parse_args(Config(), sys.argv[1:]))
