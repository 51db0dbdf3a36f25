"""GRPO on the bundled arithmetic task through the native client: sample a group of answers per question,
reward them (correct = 1), and train with the ``importance_sampling`` loss on group-normalised advantages."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

import twinkle_client
from twinkle.data import arithmetic_dataset, arithmetic_reward, encode_prompt
from twinkle.types import Datum, LoraConfig, ModelInput, SamplingParams, TensorData
from twinkle_client.model import TransformersModel
from twinkle_client.sampler import Sampler
from twinkle_client.widgets import LiveCurve


@dataclass
class Config:
    base_url: str = os.environ.get("TWINKLE_SERVER_URL", "http://127.0.0.1:8000")
    api_key: str | None = os.environ.get("TWINKLE_API_KEY")
    model_id: str | None = os.environ.get("TWINKLE_MODEL")
    rank: int = 8
    lr: float = 2e-3
    questions_per_step: int = 4
    group_size: int = 4
    max_tokens: int = 12
    temperature: float = 1.0
    steps: int = int(os.environ.get("TWINKLE_STEPS", "30"))
    seed: int = 0


def rl_datum(prompt: list[int], completion: list[int], logprobs: list[float], advantage: float) -> Datum:
    tokens = prompt + completion
    n_in = len(tokens) - 1
    mask = np.zeros(n_in, dtype=np.float32)
    mask[len(prompt) - 1:] = 1.0
    old = np.zeros(n_in, dtype=np.float32)
    old[len(prompt) - 1:] = logprobs
    return Datum(model_input=ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
        "target_tokens": TensorData.from_numpy(np.asarray(tokens[1:], dtype=np.int64)),
        "weights": TensorData.from_numpy(mask),
        "logprobs": TensorData.from_numpy(old),
        "advantages": TensorData.from_numpy(mask * advantage),
    })


def main(cfg: Config) -> None:
    with twinkle_client.init_twinkle_client(cfg.base_url, cfg.api_key):
        model = TransformersModel(model_id=cfg.model_id, seed=cfg.seed)
        model.add_adapter_to_model("grpo", LoraConfig(rank=cfg.rank))
        model.set_optimizer("AdamW", lr=cfg.lr)
        tok = model.get_tokenizer()
        sampler = Sampler(model)
        problems = arithmetic_dataset(cfg.steps * cfg.questions_per_step, seed=cfg.seed)
        params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature)
        curve = LiveCurve(metrics=("reward",), title="GRPO arithmetic", total=cfg.steps)
        for step in curve.range(cfg.steps):
            batch, rewards_all = [], []
            rows = problems[step * cfg.questions_per_step:(step + 1) * cfg.questions_per_step]
            futures = [(row, ids := encode_prompt(tok, row["messages"]),
                        sampler.sample_async(ids, params, num_samples=cfg.group_size)) for row in rows]
            for row, ids, fut in futures:
                seqs = fut.result().sequences
                rewards = np.array([arithmetic_reward(tok.decode(s.tokens, skip_special_tokens=True), row["answer"])
                                    for s in seqs])
                rewards_all.extend(rewards)
                adv = rewards - rewards.mean()
                if np.allclose(adv, 0):
                    continue  # no signal in this group
                batch += [rl_datum(ids, s.tokens, s.logprobs or [0.0] * len(s.tokens), float(a))
                          for s, a in zip(seqs, adv, strict=True) if s.tokens]
            if batch:
                model.forward_backward(inputs=batch, loss_fn="importance_sampling")
                model.clip_grad_and_step()
            curve.log({"reward": float(np.mean(rewards_all))}, step=step, run="grpo")
        print("saved:", model.save("grpo-final", save_optimizer=False))


if __name__ == "__main__":
    main(Config())
