"""Teach a model who it is (self-cognition SFT) with the unmodified Tinker SDK on a self-hosted Twinkle server.

    TWINKLE_API_KEY=tml-... python cookbook/client/tinker/self_host/self_cognition.py --steps=40

Uses the bundled self-cognition rows with ``{name}``/``{author}`` filled in; only assistant tokens are trained.
Prints the loss per step, the model's answer to "Who are you?" before and after, and a final RESULT line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import tinker
from tinker import types

from twinkle.data import apply_chat_template, encode_prompt, self_cognition_dataset


@dataclass
class Config:
    base_url: str = os.environ.get("TWINKLE_SERVER_URL", "http://127.0.0.1:8000")
    api_key: str = os.environ.get("TWINKLE_API_KEY", "")
    base_model: str = os.environ.get("TWINKLE_BASE_MODEL", "builtin://tiny")
    name: str = "Twinkle"
    author: str = "the Twinkle team"
    lora_rank: int = 16
    learning_rate: float = 3e-3
    batch_size: int = 8
    steps: int = int(os.environ.get("TWINKLE_STEPS", "40"))


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


def ask(training: tinker.TrainingClient, tokenizer, question: str) -> str:
    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(encode_prompt(tokenizer, question))
    out = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=24, temperature=0.0)).result()
    return tokenizer.decode(out.sequences[0].tokens, skip_special_tokens=True)


def main(cfg: Config) -> dict:
    service = tinker.ServiceClient(base_url=cfg.base_url, api_key=cfg.api_key or None)
    training = service.create_lora_training_client(base_model=cfg.base_model, rank=cfg.lora_rank).result()
    tokenizer = training.get_tokenizer()
    data = [to_datum(apply_chat_template(tokenizer, row["messages"]))
            for row in self_cognition_dataset(cfg.name, cfg.author)]
    before = ask(training, tokenizer, "Who are you?")
    print(f"before: Who are you? -> {before!r}")

    losses = []
    for step in range(cfg.steps):
        start = (step * cfg.batch_size) % len(data)
        batch = data[start : start + cfg.batch_size]
        fwd_bwd = training.forward_backward(batch, "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=cfg.learning_rate))
        n_tokens = sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in batch)
        losses.append(fwd_bwd.result().metrics["loss:sum"] / max(n_tokens, 1.0))
        print(f"step {step:3d}  loss/token {losses[-1]:.4f}", flush=True)

    after = ask(training, tokenizer, "Who are you?")
    print(f"after:  Who are you? -> {after!r}")
    path = training.save_weights_for_sampler("self-cognition").result().path
    print(f"saved {path}")
    service.close("success").result()
    result = {"first_loss": losses[0], "last_loss": losses[-1], "losses": losses, "before": before,
              "after": after, "path": path}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(parse_args(Config()))
