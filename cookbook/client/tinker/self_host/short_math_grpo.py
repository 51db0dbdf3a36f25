"""GRPO on the bundled arithmetic task with the unmodified Tinker SDK against a self-hosted Twinkle server.

    TWINKLE_API_KEY=tml-... python cookbook/client/tinker/self_host/short_math_grpo.py --rl_steps=20

A toy model knows no arithmetic, so a short supervised warm-up first teaches the answer format
("3 + 4 = 7."); then each GRPO step samples a group of answers per question, scores them with
``twinkle.data.arithmetic_reward`` (1 for the right final number), centres the rewards within each group
(the advantage) and takes an ``importance_sampling`` step on the sampled tokens. Prints the mean reward per
step and a final RESULT line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
from dataclasses import dataclass

import tinker
from tinker import types

from twinkle.data import apply_chat_template, arithmetic_dataset, arithmetic_reward, encode_prompt


@dataclass
class Config:
    base_url: str = os.environ.get("TWINKLE_SERVER_URL", "http://127.0.0.1:8000")
    api_key: str = os.environ.get("TWINKLE_API_KEY", "")
    base_model: str = os.environ.get("TWINKLE_BASE_MODEL", "builtin://tiny")
    lora_rank: int = 16
    max_operand: int = 3
    warmup_steps: int = int(os.environ.get("TWINKLE_WARMUP_STEPS", "12"))
    warmup_lr: float = 5e-3
    rl_steps: int = int(os.environ.get("TWINKLE_STEPS", "20"))
    rl_lr: float = 2e-3
    questions_per_step: int = 4
    group_size: int = 8
    max_tokens: int = 10
    temperature: float = 1.0
    seed: int = 0


def parse_args(cfg: Config) -> Config:
    for arg in sys.argv[1:]:
        name, _, value = arg.lstrip("-").partition("=")
        field = name.replace("-", "_")
        cfg = dataclasses.replace(cfg, **{field: type(getattr(cfg, field))(value)})
    return cfg


def sft_datum(example: dict) -> types.Datum:
    ids, labels = example["input_ids"], example["labels"]
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [0.0 if x == -100 else 1.0 for x in labels[1:]]},
    )


def rl_datum(prompt: list[int], completion: list[int], sampled_logprobs: list[float], advantage: float) -> types.Datum:
    """Prompt positions get zero advantage (not trained); sampled tokens get the group-relative advantage."""
    tokens = prompt + completion
    n_prompt = len(prompt) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:],
            "logprobs": [0.0] * n_prompt + list(sampled_logprobs),
            "advantages": [0.0] * n_prompt + [advantage] * len(completion),
        },
    )


def main(cfg: Config) -> dict:
    rng = random.Random(cfg.seed)
    service = tinker.ServiceClient(base_url=cfg.base_url, api_key=cfg.api_key or None)
    training = service.create_lora_training_client(base_model=cfg.base_model, rank=cfg.lora_rank,
                                                   seed=cfg.seed).result()
    tokenizer = training.get_tokenizer()
    problems = list(arithmetic_dataset(200, seed=cfg.seed, max_operand=cfg.max_operand, with_answer=True))

    # 1. a short supervised warm-up: the answer format, and a first guess at the sums
    warm = [sft_datum(apply_chat_template(tokenizer, p["messages"])) for p in problems]
    for step in range(cfg.warmup_steps):
        batch = rng.sample(warm, 16)
        out = training.forward_backward(batch, "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=cfg.warmup_lr))
        print(f"warm-up {step:3d}  loss {out.result().metrics['loss:sum']:.2f}", flush=True)

    # 2. GRPO
    params = types.SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature)
    rewards_per_step = []
    for step in range(cfg.rl_steps):
        sampler = training.save_weights_and_get_sampling_client().result()
        questions = rng.sample(problems, cfg.questions_per_step)
        prompts = [encode_prompt(tokenizer, q["question"]) for q in questions]
        futures = [sampler.sample(types.ModelInput.from_ints(p), cfg.group_size, params) for p in prompts]
        batch, step_rewards = [], []
        for q, prompt, fut in zip(questions, prompts, futures, strict=True):
            seqs = fut.result().sequences
            rewards = [arithmetic_reward(tokenizer.decode(s.tokens, skip_special_tokens=True), q["answer"])
                       for s in seqs]
            mean = sum(rewards) / len(rewards)
            step_rewards.extend(rewards)
            for s, r in zip(seqs, rewards, strict=True):
                if r != mean:  # a group where every answer scores the same teaches nothing
                    batch.append(rl_datum(prompt, s.tokens, s.logprobs, r - mean))
        rewards_per_step.append(sum(step_rewards) / len(step_rewards))
        if batch:
            training.forward_backward(batch, "importance_sampling")
            training.optim_step(types.AdamParams(learning_rate=cfg.rl_lr)).result()
        print(f"grpo {step:3d}  mean reward {rewards_per_step[-1]:.3f}  trained on {len(batch)} samples", flush=True)

    service.close("success").result()
    k = max(1, len(rewards_per_step) // 3)
    result = {"rewards": rewards_per_step, "first_reward": sum(rewards_per_step[:k]) / k,
              "last_reward": sum(rewards_per_step[-k:]) / k}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(parse_args(Config()))
