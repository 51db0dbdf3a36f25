"""Direct Preference Optimisation with the unmodified Tinker SDK (client-side loss via forward_backward_custom).

    TWINKLE_API_KEY=tml-... python cookbook/client/tinker/self_host/dpo.py --steps=30

Pairs: each self-cognition question with a chosen answer that gives the model a new name ("Sparkle", by "the
Sparkle team") and a rejected one with its old name ("Twinkle"). The reference policy is the base model: a
fresh LoRA adapter is exactly the base model (its B matrices start at zero), so the reference logprobs are one
``forward`` before the first step. The DPO loss ``-log sigmoid(beta * ((lp_c - ref_c) - (lp_r - ref_r)))``
runs in this process on the logprobs the server returns; the SDK turns its gradient into a weighted
cross-entropy step on the server.

Before and after training the preference accuracy is measured directly: the share of pairs where the model
gives the chosen answer the higher total log-probability. The base model prefers the rejected answers (the old
name is one token, the new one several), so the accuracy starts low. Prints the loss per step and a final
``RESULT {json}`` line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import tinker
import torch
from tinker import types

from twinkle.data import DPOPairPreprocessor, identity_preference_pairs


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
    learning_rate: float = 2e-3
    beta: float = 0.1
    pairs_per_batch: int = 8
    steps: int = int(os.environ.get("TWINKLE_STEPS", "30"))
    seed: int = 0


def parse_args(cfg: Config, argv: list[str]) -> Config:
    """``--name=value`` flags override the defaults above."""
    for arg in argv:
        name, _, value = arg.lstrip("-").partition("=")
        field = name.replace("-", "_")
        cfg = dataclasses.replace(cfg, **{field: type(getattr(cfg, field))(value)})
    return cfg


def preference_pairs(cfg: Config) -> list[dict]:
    """One ``{prompt, chosen, rejected}`` per self-cognition question: new name chosen, old name rejected."""
    return identity_preference_pairs(cfg.name, cfg.author, cfg.old_name, cfg.old_author)


def to_datum(example: dict) -> types.Datum:
    ids, labels = example["input_ids"], example["labels"]
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [0.0 if x == -100 else 1.0 for x in labels[1:]]},
    )


def seq_logprob(datum: types.Datum, logprobs: torch.Tensor) -> torch.Tensor:
    """Sum of the answer tokens' logprobs (weights mask the prompt)."""
    return (logprobs * datum.loss_fn_inputs["weights"].to_torch()).sum()


def answer_logprobs(training: tinker.TrainingClient, data: list[types.Datum]) -> list[float]:
    """Total log-probability of each datum's answer under the adapter's current weights."""
    outputs = training.forward(data, "cross_entropy").result().loss_fn_outputs
    return [float(seq_logprob(d, out["logprobs"].to_torch())) for d, out in zip(data, outputs, strict=True)]


def preference_accuracy(scores: list[float]) -> float:
    """Share of pairs (chosen, rejected, chosen, ...) whose chosen answer has the higher total log-probability."""
    wins = [c > r for c, r in zip(scores[0::2], scores[1::2], strict=True)]
    return sum(wins) / len(wins)


def pair_batches(n: int, size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of pair indices: passes over ``range(n)``, each in a new seeded order."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n - size + 1, size):
            yield order[i:i + size]


def main(cfg: Config) -> dict:
    service = tinker.ServiceClient(base_url=cfg.base_url, api_key=cfg.api_key or None)
    training = service.create_lora_training_client(base_model=cfg.base_model, rank=cfg.lora_rank,
                                                   seed=cfg.seed).result()
    encode = DPOPairPreprocessor(training.get_tokenizer(), max_length=256)
    pairs = [[to_datum(ex) for ex in encode.to_examples(p)] for p in preference_pairs(cfg)]  # [chosen, rejected]
    data = [d for pair in pairs for d in pair]

    # the fresh adapter is the base model: its logprobs are both the reference and the "before" measure
    ref = answer_logprobs(training, data)
    acc_before = preference_accuracy(ref)
    print(f"preference accuracy before: {acc_before:.2f} on {len(pairs)} pairs", flush=True)

    batches = pair_batches(len(pairs), cfg.pairs_per_batch, cfg.seed)
    losses = []
    for step in range(cfg.steps):
        picked = next(batches)
        batch = [d for i in picked for d in pairs[i]]
        batch_ref = [ref[2 * i + k] for i in picked for k in (0, 1)]

        def dpo_loss(batch: list[types.Datum], logprobs: list[torch.Tensor], batch_ref: list[float] = batch_ref):
            margins = []
            for i in range(0, len(batch), 2):
                chosen = seq_logprob(batch[i], logprobs[i]) - batch_ref[i]
                rejected = seq_logprob(batch[i + 1], logprobs[i + 1]) - batch_ref[i + 1]
                margins.append(cfg.beta * (chosen - rejected))
            loss = -torch.nn.functional.logsigmoid(torch.stack(margins)).mean()
            return loss, {"dpo_loss:mean": float(loss.detach())}

        out = training.forward_backward_custom(batch, dpo_loss).result()
        training.optim_step(types.AdamParams(learning_rate=cfg.learning_rate, grad_clip_norm=1.0)).result()
        losses.append(out.metrics["dpo_loss:mean"])
        print(f"step {step:3d}  dpo loss {losses[-1]:.4f}", flush=True)

    acc_after = preference_accuracy(answer_logprobs(training, data))
    print(f"dpo loss {losses[0]:.3f} -> {losses[-1]:.3f}; preference accuracy {acc_before:.2f} -> {acc_after:.2f}",
          flush=True)
    service.close("success").result()
    result = {"losses": losses, "accuracy_before": acc_before, "accuracy_after": acc_after}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(parse_args(Config(), sys.argv[1:]))
