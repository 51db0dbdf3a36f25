"""GRPO on the bundled arithmetic task with the unmodified Tinker SDK against a self-hosted Twinkle server.

    TWINKLE_API_KEY=tml-... python cookbook/client/tinker/self_host/short_math_grpo.py --rl_steps=20

The task is kept small enough for a randomly initialised toy model to improve within a minute on a CPU:
sums of two digits 0..3 ("What is 2 + 3?"), answered in the worked form "2 + 3 = 5." (the answer is one
token). A toy model knows no arithmetic and not even the answer format, so:

1. a short supervised warm-up shows it the format (and leaves it a poor guesser at the sums);
2. GRPO: each step samples a group of answers per question at temperature 1, scores them with
   ``arithmetic_reward`` (partial credit 0.2 for a well-formed answer, the rest for the right number), centres
   the rewards within each group (the advantage) and takes an ``importance_sampling`` step on the sampled
   tokens. Only the rewards teach it here: no reference answers.

Greedy accuracy on every problem is measured after the warm-up and after GRPO. Prints one line per step and a
final ``RESULT {json}`` line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass

import tinker
from tinker import types

from twinkle.data import apply_chat_template, arithmetic_dataset, arithmetic_reward, encode_prompt


@dataclass
class Config:
    base_url: str = os.environ.get("TWINKLE_SERVER_URL", "http://127.0.0.1:8000")
    api_key: str = os.environ.get("TWINKLE_API_KEY", "")
    base_model: str = os.environ.get("TWINKLE_BASE_MODEL", "builtin://tiny")
    lora_rank: int = 32
    max_operand: int = 3  # 16 problems, sums 0..6
    format_reward: float = 0.2
    warmup_steps: int = 50
    warmup_batch: int = 16
    rl_steps: int = int(os.environ.get("TWINKLE_STEPS", "20"))
    warmup_lr: float = 4e-3
    rl_lr: float = 1e-3  # Adam steps by about lr whatever the gradient: at 2e-3 noisy RL steps can wreck the toy
    questions_per_step: int = 16  # every problem, every step
    group_size: int = 8
    max_tokens: int = 12
    temperature: float = 1.0
    seed: int = 0


def parse_args(cfg: Config, argv: list[str]) -> Config:
    """``--name=value`` flags override the defaults above."""
    for arg in argv:
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


def greedy_accuracy(sampler: tinker.SamplingClient, tokenizer, problems: list[dict]) -> tuple[float, list[str]]:
    """Fraction of ``problems`` answered right at temperature 0, and the answers."""
    params = types.SamplingParams(max_tokens=12, temperature=0.0)
    futures = [sampler.sample(types.ModelInput.from_ints(encode_prompt(tokenizer, p["question"])), 1, params)
               for p in problems]
    answers = [tokenizer.decode(f.result().sequences[0].tokens, skip_special_tokens=True) for f in futures]
    right = [arithmetic_reward(a, p["answer"]) for a, p in zip(answers, problems, strict=True)]
    return sum(right) / len(right), answers


def main(cfg: Config) -> dict:
    t0 = time.perf_counter()
    clock, phases = [t0], {}  # seconds per phase (setup, warmup, greedy, sample, train), in RESULT

    def lap(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round(phases.get(name, 0.0) + now - clock[0], 3)
        clock[0] = now

    rng = random.Random(cfg.seed)
    service = tinker.ServiceClient(base_url=cfg.base_url, api_key=cfg.api_key or None)
    training = service.create_lora_training_client(base_model=cfg.base_model, rank=cfg.lora_rank,
                                                   seed=cfg.seed).result()
    tokenizer = training.get_tokenizer()
    rows = arithmetic_dataset(400, seed=cfg.seed, max_operand=cfg.max_operand, max_answer=9, with_answer=True)
    problems = list({r["question"]: r for r in rows}.values())  # every distinct question, once


    # 1. supervised warm-up: the answer format
    lap("setup")
    warm = [sft_datum(apply_chat_template(tokenizer, p["messages"])) for p in rows]
    for step in range(cfg.warmup_steps):
        out = training.forward_backward(rng.sample(warm, cfg.warmup_batch), "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=cfg.warmup_lr, grad_clip_norm=1.0))
        print(f"warm-up {step:3d}  loss {out.result().metrics['loss:sum']:.2f}", flush=True)
    sampler = training.save_weights_and_get_sampling_client().result()
    lap("warmup")
    acc_before, _ = greedy_accuracy(sampler, tokenizer, problems)
    lap("greedy")
    print(f"greedy accuracy after warm-up: {acc_before:.2f} on {len(problems)} problems", flush=True)

    # 2. GRPO: the reward is the only teacher
    rewards_per_step = []
    for step in range(cfg.rl_steps):
        questions = rng.sample(problems, cfg.questions_per_step)
        prompts = [encode_prompt(tokenizer, q["question"]) for q in questions]
        futures = [sampler.sample(types.ModelInput.from_ints(p), cfg.group_size,
                                  types.SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                                       seed=cfg.seed + 1000 * step + i))
                   for i, p in enumerate(prompts)]
        batch, step_rewards = [], []
        for q, prompt, fut in zip(questions, prompts, futures, strict=True):
            seqs = fut.result().sequences
            rewards = [arithmetic_reward(tokenizer.decode(s.tokens, skip_special_tokens=True), q["answer"],
                                         format_reward=cfg.format_reward) for s in seqs]
            mean = sum(rewards) / len(rewards)
            step_rewards.extend(rewards)
            for s, r in zip(seqs, rewards, strict=True):
                if r != mean:  # a group where every answer scores the same teaches nothing
                    batch.append(rl_datum(prompt, s.tokens, s.logprobs, r - mean))
        rewards_per_step.append(sum(step_rewards) / len(step_rewards))
        lap("sample")
        if batch:
            training.forward_backward(batch, "importance_sampling")
            training.optim_step(types.AdamParams(learning_rate=cfg.rl_lr, grad_clip_norm=1.0))
        sampler = training.save_weights_and_get_sampling_client().result()  # waits for the step
        lap("train")
        print(f"grpo {step:3d}  mean reward {rewards_per_step[-1]:.3f}  trained on {len(batch)} samples", flush=True)

    acc_after, answers = greedy_accuracy(sampler, tokenizer, problems)
    lap("greedy")
    print(f"greedy accuracy after GRPO: {acc_after:.2f}", flush=True)
    for p, a in list(zip(problems, answers, strict=True))[:4]:
        print(f"  {p['question']} -> {a!r}")
    service.close("success").result()
    k = max(1, len(rewards_per_step) // 4)
    result = {"rewards": rewards_per_step, "first_reward": sum(rewards_per_step[:k]) / k,
              "last_reward": sum(rewards_per_step[-k:]) / k, "accuracy_before": acc_before,
              "accuracy_after": acc_after, "seconds": time.perf_counter() - t0, "phases": phases}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(parse_args(Config(), sys.argv[1:]))
