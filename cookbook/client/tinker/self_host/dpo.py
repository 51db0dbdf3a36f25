"""Direct Preference Optimisation with the unmodified Tinker SDK (client-side loss via forward_backward_custom).

    TWINKLE_API_KEY=tml-... python cookbook/client/tinker/self_host/dpo.py --steps=15

Pairs: an arithmetic question with the right worked answer (chosen) and a wrong one (rejected). The reference
policy is the starting adapter: its logprobs are computed once with ``forward``. The DPO loss
``-log sigmoid(beta * ((lp_c - ref_c) - (lp_r - ref_r)))`` runs in this process on the logprobs the server
returns; the SDK turns its gradient into a weighted cross-entropy step on the server. Prints the loss and the
preference accuracy (chosen beats rejected by a margin) per step, and a final RESULT line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import tinker
import torch
from tinker import types

from twinkle.data import DPOPairPreprocessor, arithmetic_dataset


@dataclass
class Config:
    base_url: str = os.environ.get("TWINKLE_SERVER_URL", "http://127.0.0.1:8000")
    api_key: str = os.environ.get("TWINKLE_API_KEY", "")
    base_model: str = os.environ.get("TWINKLE_BASE_MODEL", "builtin://tiny")
    lora_rank: int = 16
    learning_rate: float = 2e-3
    beta: float = 0.5
    num_pairs: int = 16
    steps: int = int(os.environ.get("TWINKLE_STEPS", "15"))


def parse_args(cfg: Config) -> Config:
    for arg in sys.argv[1:]:
        name, _, value = arg.lstrip("-").partition("=")
        field = name.replace("-", "_")
        cfg = dataclasses.replace(cfg, **{field: type(getattr(cfg, field))(value)})
    return cfg


def to_datum(example: dict) -> types.Datum:
    ids, labels = example["input_ids"], example["labels"]
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [0.0 if x == -100 else 1.0 for x in labels[1:]]},
    )


def seq_logprob(datum: types.Datum, logprobs: torch.Tensor) -> torch.Tensor:
    """Sum of the answer tokens' logprobs (weights mask the prompt)."""
    return (logprobs * datum.loss_fn_inputs["weights"].to_torch()).sum()


def main(cfg: Config) -> dict:
    service = tinker.ServiceClient(base_url=cfg.base_url, api_key=cfg.api_key or None)
    training = service.create_lora_training_client(base_model=cfg.base_model, rank=cfg.lora_rank).result()
    tokenizer = training.get_tokenizer()

    pairs = []
    for row in arithmetic_dataset(cfg.num_pairs, seed=1, max_operand=9):
        a, b = row["question"].removeprefix("What is ").removesuffix("?").split(" + ")
        pairs.append({"prompt": row["question"], "chosen": f"{a} + {b} = {row['answer']}.",
                      "rejected": f"{a} + {b} = {row['answer'] + 1 + int(a) % 3}."})
    encode = DPOPairPreprocessor(tokenizer)
    data = [to_datum(ex) for p in pairs for ex in encode.to_examples(p)]  # chosen0, rejected0, chosen1, ...

    ref = [float(seq_logprob(d, out["logprobs"].to_torch()))
           for d, out in zip(data, training.forward(data, "cross_entropy").result().loss_fn_outputs, strict=True)]

    def dpo_loss(batch: list[types.Datum], logprobs: list[torch.Tensor]):
        margins = []
        for i in range(0, len(batch), 2):
            chosen = seq_logprob(batch[i], logprobs[i]) - ref[i]
            rejected = seq_logprob(batch[i + 1], logprobs[i + 1]) - ref[i + 1]
            margins.append(cfg.beta * (chosen - rejected))
        margins_t = torch.stack(margins)
        loss = -torch.nn.functional.logsigmoid(margins_t).mean()
        accuracy = (margins_t > 0).float().mean()
        return loss, {"dpo_loss:mean": float(loss.detach()), "accuracy:mean": float(accuracy)}

    losses, accuracies = [], []
    for step in range(cfg.steps):
        out = training.forward_backward_custom(data, dpo_loss).result()
        training.optim_step(types.AdamParams(learning_rate=cfg.learning_rate)).result()
        losses.append(out.metrics["dpo_loss:mean"])
        accuracies.append(out.metrics["accuracy:mean"])
        print(f"step {step:3d}  dpo loss {losses[-1]:.4f}  preference accuracy {accuracies[-1]:.2f}", flush=True)

    service.close("success").result()
    result = {"losses": losses, "accuracies": accuracies, "first_accuracy": accuracies[0],
              "last_accuracy": accuracies[-1]}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(parse_args(Config()))
