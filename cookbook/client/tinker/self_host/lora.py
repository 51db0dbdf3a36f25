"""Supervised LoRA fine-tuning with the unmodified Tinker SDK against a self-hosted Twinkle server.

    twinkle-server launch --model builtin://tiny          # in another terminal
    TWINKLE_API_KEY=tml-... python cookbook/client/tinker/self_host/lora.py --steps=30

The data is the bundled arithmetic task with worked answers ("What is 3 + 4?" -> "3 + 4 = 7."), rendered with
the chat template; only the assistant tokens are trained. Prints the loss per step and a final RESULT line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import tinker
from tinker import types

from twinkle.data import apply_chat_template, arithmetic_dataset, encode_prompt


@dataclass
class Config:
    base_url: str = os.environ.get("TWINKLE_SERVER_URL", "http://127.0.0.1:8000")
    api_key: str = os.environ.get("TWINKLE_API_KEY", "")
    base_model: str = os.environ.get("TWINKLE_BASE_MODEL", "builtin://tiny")
    lora_rank: int = 16
    learning_rate: float = 5e-3
    batch_size: int = 16
    steps: int = int(os.environ.get("TWINKLE_STEPS", "30"))
    num_problems: int = 200
    save_name: str = "lora-final"


def parse_args(cfg: Config) -> Config:
    """``--name=value`` flags override the defaults above."""
    for arg in sys.argv[1:]:
        name, _, value = arg.lstrip("-").partition("=")
        field = name.replace("-", "_")
        kind = type(getattr(cfg, field))
        cfg = dataclasses.replace(cfg, **{field: kind(value)})
    return cfg


def to_datum(example: dict) -> types.Datum:
    """HF-style ``{input_ids, labels}`` (-100 = not trained) -> a next-token Tinker Datum."""
    ids, labels = example["input_ids"], example["labels"]
    weights = [0.0 if lab == -100 else 1.0 for lab in labels[1:]]
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": weights},
    )


def main(cfg: Config) -> dict:
    service = tinker.ServiceClient(base_url=cfg.base_url, api_key=cfg.api_key or None)
    training = service.create_lora_training_client(base_model=cfg.base_model, rank=cfg.lora_rank).result()
    tokenizer = training.get_tokenizer()

    rows = arithmetic_dataset(cfg.num_problems, seed=0, max_operand=4, with_answer=True)
    data = [to_datum(apply_chat_template(tokenizer, row["messages"])) for row in rows]

    losses = []
    for step in range(cfg.steps):
        start = (step * cfg.batch_size) % len(data)
        batch = data[start : start + cfg.batch_size]
        fwd_bwd = training.forward_backward(batch, "cross_entropy")
        optim = training.optim_step(types.AdamParams(learning_rate=cfg.learning_rate))
        out = fwd_bwd.result()
        optim.result()
        n_tokens = sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in batch)
        loss = out.metrics["loss:sum"] / max(n_tokens, 1.0)
        losses.append(loss)
        print(f"step {step:3d}  loss/token {loss:.4f}", flush=True)

    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(encode_prompt(tokenizer, "What is 2 + 3?"))
    answer = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=12, temperature=0.0)).result()
    text = tokenizer.decode(answer.sequences[0].tokens, skip_special_tokens=True)
    print(f"What is 2 + 3? -> {text!r}")
    path = training.save_state(cfg.save_name).result().path
    print(f"saved {path}")
    service.close("success").result()
    result = {"first_loss": losses[0], "last_loss": losses[-1], "losses": losses, "sample": text, "path": path}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(parse_args(Config()))
