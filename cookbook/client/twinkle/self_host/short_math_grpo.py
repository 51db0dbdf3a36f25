"""GRPO on the bundled arithmetic task through the native client (``twinkle_client``).

    TWINKLE_API_KEY=... python cookbook/client/twinkle/self_host/short_math_grpo.py --rl_steps=20

The same recipe as ``cookbook/client/tinker/self_host/short_math_grpo.py``: sums of two digits 0..3 answered
in the worked form "2 + 3 = 5."; a short supervised warm-up teaches a random toy model the format, then GRPO
learns from the reward alone (``arithmetic_reward`` with partial credit 0.2 for a well-formed answer): a group
of answers per question at temperature 1, rewards centred within each group, an ``importance_sampling`` step.
Greedy accuracy on every problem is measured after the warm-up and after GRPO. Ends with ``RESULT {json}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass

import twinkle_client
from twinkle.data import ChatEncoder, arithmetic_dataset, arithmetic_reward, encode_prompt
from twinkle.types import AdamParams, Datum, LoraConfig, ModelInput, SamplingParams, TensorData
from twinkle_client.model import TransformersModel
from twinkle_client.sampler import Sampler
from twinkle_client.widgets import LiveCurve


@dataclass
class Config:
    base_url: str = os.environ.get("TWINKLE_SERVER_URL", "http://127.0.0.1:8000")
    api_key: str = os.environ.get("TWINKLE_API_KEY", "")
    base_model: str = os.environ.get("TWINKLE_BASE_MODEL") or os.environ.get("TWINKLE_MODEL") or "builtin://tiny"
    lora_rank: int = 32
    max_operand: int = 3  # 16 problems, sums 0..6
    format_reward: float = 0.2
    warmup_steps: int = 50
    warmup_batch: int = 16
    warmup_lr: float = 4e-3
    rl_steps: int = int(os.environ.get("TWINKLE_STEPS", "20"))
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


def rl_datum(prompt: list[int], completion: list[int], sampled_logprobs: list[float], advantage: float) -> Datum:
    """Prompt positions get zero advantage (not trained); sampled tokens get the group-relative advantage."""
    tokens = prompt + completion
    n_prompt = len(prompt) - 1
    return Datum(model_input=ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
        "target_tokens": TensorData.from_numpy(tokens[1:], dtype="int64"),
        "logprobs": TensorData.from_numpy([0.0] * n_prompt + list(sampled_logprobs), dtype="float32"),
        "advantages": TensorData.from_numpy([0.0] * n_prompt + [advantage] * len(completion), dtype="float32"),
    })


def greedy_accuracy(sampler: Sampler, tokenizer, problems: list[dict]) -> tuple[float, list[str]]:
    """Fraction of ``problems`` answered right at temperature 0, and the answers."""
    params = SamplingParams(max_tokens=12, temperature=0.0)
    futures = [sampler.sample_async(encode_prompt(tokenizer, p["question"]), params) for p in problems]
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
    with twinkle_client.init_twinkle_client(cfg.base_url, cfg.api_key or None):
        model = TransformersModel(cfg.base_model, seed=cfg.seed)
        model.add_adapter_to_model("grpo", LoraConfig(rank=cfg.lora_rank, seed=cfg.seed))
        model.set_optimizer("AdamW", lr=cfg.warmup_lr, grad_clip_norm=1.0)
        tokenizer = model.get_tokenizer()
        sampler = Sampler(model)  # always samples with the adapter's current weights
        rows = arithmetic_dataset(400, seed=cfg.seed, max_operand=cfg.max_operand, max_answer=9, with_answer=True)
        problems = list({r["question"]: r for r in rows}.values())  # every distinct question, once

        # 1. supervised warm-up: the answer format
        lap("setup")
        warm = rows.map(ChatEncoder(tokenizer)).to_list()
        curve = LiveCurve(metrics=("loss",), title="warm-up SFT", total=cfg.warmup_steps)
        for _ in curve.range(cfg.warmup_steps):
            model.forward_backward(inputs=rng.sample(warm, cfg.warmup_batch))
            model.clip_grad_and_step()
            curve.log(model.calculate_metric(), run="warm-up")
        curve.close()
        lap("warmup")
        acc_before, _ = greedy_accuracy(sampler, tokenizer, problems)
        lap("greedy")
        print(f"greedy accuracy after warm-up: {acc_before:.2f} on {len(problems)} problems", flush=True)

        # 2. GRPO: the reward is the only teacher
        rl_adam = AdamParams(learning_rate=cfg.rl_lr, grad_clip_norm=1.0)
        rewards_per_step = []
        curve = LiveCurve(metrics=("reward",), title="GRPO: mean reward", total=cfg.rl_steps)
        for step in curve.range(cfg.rl_steps):
            questions = rng.sample(problems, cfg.questions_per_step)
            prompts = [encode_prompt(tokenizer, q["question"]) for q in questions]
            futures = [sampler.sample_async(p, SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                                              seed=cfg.seed + 1000 * step + i), num_samples=cfg.group_size)
                       for i, p in enumerate(prompts)]  # all in flight at once
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
                model.forward_backward(inputs=batch, loss_fn="importance_sampling")
                model.clip_grad_and_step(adam_params=rl_adam)
            lap("train")
            curve.log({"reward": rewards_per_step[-1]}, run="grpo")
        curve.close()

        acc_after, answers = greedy_accuracy(sampler, tokenizer, problems)
        lap("greedy")
        print(f"greedy accuracy after GRPO: {acc_after:.2f}", flush=True)
        for p, a in list(zip(problems, answers, strict=True))[:4]:
            print(f"  {p['question']} -> {a!r}")
    k = max(1, len(rewards_per_step) // 4)
    result = {"rewards": rewards_per_step, "first_reward": sum(rewards_per_step[:k]) / k,
              "last_reward": sum(rewards_per_step[-k:]) / k, "accuracy_before": acc_before,
              "accuracy_after": acc_after, "seconds": time.perf_counter() - t0, "phases": phases}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(parse_args(Config(), sys.argv[1:]))
