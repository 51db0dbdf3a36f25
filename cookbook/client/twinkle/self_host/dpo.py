"""Direct Preference Optimisation through the native client, on preference pairs about the model's identity.

    TWINKLE_API_KEY=... python cookbook/client/twinkle/self_host/dpo.py --steps=30

Each pair asks a self-cognition question; the chosen answer gives the model a new name ("Sparkle", by "the
Sparkle team"), the rejected one its old name ("Twinkle"). The server's ``dpo`` loss compares the adapter with
the base model (the adapter switched off) as the reference. Before and after training, the preference accuracy
is measured directly: the share of pairs where the policy gives the chosen answer the higher total
log-probability. The base model prefers the rejected answers (their name is one token, the new one four), so
the accuracy starts near 0. Ends with a
``RESULT {json}`` line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import twinkle_client
from twinkle.data import DataLoader, DPOPairPreprocessor, flatten_pairs, identity_preference_pairs, to_datums
from twinkle.types import LoraConfig
from twinkle_client.model import TransformersModel
from twinkle_client.widgets import LiveCurve


@dataclass
class Config:
    base_url: str = os.environ.get("TWINKLE_SERVER_URL", "http://127.0.0.1:8000")
    api_key: str = os.environ.get("TWINKLE_API_KEY", "")
    base_model: str = os.environ.get("TWINKLE_BASE_MODEL") or os.environ.get("TWINKLE_MODEL") or "builtin://tiny"
    name: str = "Sparkle"
    author: str = "the Sparkle team"
    old_name: str = "Twinkle"
    old_author: str = "the Twinkle team"
    lora_rank: int = 16
    lr: float = 2e-3
    beta: float = 0.1
    pairs_per_batch: int = 8
    steps: int = int(os.environ.get("TWINKLE_STEPS", "30"))
    seed: int = 0


def parse_args(cfg: Config, argv: list[str]) -> Config:
    """``--name=value`` flags override the defaults above."""
    for arg in argv:
        key, _, value = arg.lstrip("-").partition("=")
        field = key.replace("-", "_")
        cfg = dataclasses.replace(cfg, **{field: type(getattr(cfg, field))(value)})
    return cfg


def preference_pairs(cfg: Config) -> list[dict]:
    """One ``{prompt, chosen, rejected}`` per self-cognition question: new name chosen, old name rejected."""
    return identity_preference_pairs(cfg.name, cfg.author, cfg.old_name, cfg.old_author)


def preference_accuracy(model: TransformersModel, encoded: list[dict]) -> float:
    """Share of pairs whose chosen answer has the higher summed log-probability under the current adapter."""
    datums = to_datums(flatten_pairs(encoded))
    outputs = model.forward(inputs=datums).loss_fn_outputs
    scores = [float((out["logprobs"].to_numpy() * d.loss_fn_inputs["weights"].to_numpy()).sum())
              for d, out in zip(datums, outputs, strict=True)]
    wins = [c > r for c, r in zip(scores[0::2], scores[1::2], strict=True)]
    return sum(wins) / len(wins)


def main(cfg: Config) -> dict:
    with twinkle_client.init_twinkle_client(cfg.base_url, cfg.api_key or None):
        model = TransformersModel(cfg.base_model, seed=cfg.seed)
        model.add_adapter_to_model("dpo", LoraConfig(rank=cfg.lora_rank, seed=cfg.seed))
        model.set_optimizer("AdamW", lr=cfg.lr, grad_clip_norm=1.0)
        encoded = [DPOPairPreprocessor(model.get_tokenizer(), max_length=256)(p) for p in preference_pairs(cfg)]
        acc_before = preference_accuracy(model, encoded)
        print(f"preference accuracy before: {acc_before:.2f} on {len(encoded)} pairs", flush=True)

        batches = DataLoader(encoded, batch_size=cfg.pairs_per_batch, shuffle=True, seed=cfg.seed).cycle()
        curve = LiveCurve(metrics=("loss", "accuracy"), title="DPO", total=cfg.steps)
        losses = []
        for _ in curve.range(cfg.steps):
            out = model.forward_backward(inputs=flatten_pairs(next(batches)), loss_fn="dpo",
                                         loss_fn_config={"beta": cfg.beta})
            model.clip_grad_and_step()
            losses.append(out.metrics["loss:sum"] / cfg.pairs_per_batch)
            curve.log({"loss": losses[-1], "accuracy": out.metrics["dpo_accuracy:mean"]}, run="dpo")
        curve.close()

        acc_after = preference_accuracy(model, encoded)
        print(f"dpo loss {losses[0]:.3f} -> {losses[-1]:.3f}; preference accuracy {acc_before:.2f} -> {acc_after:.2f}")
        path = model.save("dpo-final", save_optimizer=False)
        print(f"saved {path}")
    result = {"losses": losses, "accuracy_before": acc_before, "accuracy_after": acc_after, "path": path}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(parse_args(Config(), sys.argv[1:]))
