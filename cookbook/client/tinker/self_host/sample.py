"""Sample from a base model (or a saved LoRA checkpoint) with the unmodified Tinker SDK.

    TWINKLE_API_KEY=tml-... python cookbook/client/tinker/self_host/sample.py --prompt="Once upon a time"
    python .../sample.py --model_path=tinker://<run>/sampler_weights/<name>

Prints each completion with its stop reason, the prompt's logprobs, and a final RESULT line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import tinker
from tinker import types


@dataclass
class Config:
    base_url: str = os.environ.get("TWINKLE_SERVER_URL", "http://127.0.0.1:8000")
    api_key: str = os.environ.get("TWINKLE_API_KEY", "")
    base_model: str = os.environ.get("TWINKLE_BASE_MODEL", "builtin://tiny")
    model_path: str = ""  # a tinker:// checkpoint; empty samples the base model
    prompt: str = "Once upon a time"
    num_samples: int = 3
    max_tokens: int = 24
    temperature: float = 0.8
    seed: int = 0


def parse_args(cfg: Config) -> Config:
    for arg in sys.argv[1:]:
        name, _, value = arg.lstrip("-").partition("=")
        field = name.replace("-", "_")
        cfg = dataclasses.replace(cfg, **{field: type(getattr(cfg, field))(value)})
    return cfg


def main(cfg: Config) -> dict:
    service = tinker.ServiceClient(base_url=cfg.base_url, api_key=cfg.api_key or None)
    if cfg.model_path:
        sampler = service.create_sampling_client(model_path=cfg.model_path).result()
    else:
        sampler = service.create_sampling_client(base_model=cfg.base_model).result()
    # The tokenizer id comes from the server (a local path on a self-hosted box).
    tokenizer = service.create_lora_training_client(base_model=sampler.get_base_model(), rank=1).result().get_tokenizer()

    prompt = types.ModelInput.from_ints(tokenizer.encode(cfg.prompt))
    params = types.SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed)
    response = sampler.sample(prompt, cfg.num_samples, params).result()
    completions = []
    for seq in response.sequences:
        text = tokenizer.decode(seq.tokens, skip_special_tokens=True)
        completions.append({"text": text, "stop_reason": seq.stop_reason, "tokens": seq.tokens})
        print(f"[{seq.stop_reason}] {cfg.prompt}{text}")

    logprobs = sampler.compute_logprobs(prompt).result()
    print("prompt logprobs:", ["-" if lp is None else round(lp, 2) for lp in logprobs])
    service.close("success").result()
    result = {"completions": completions, "prompt_logprobs": logprobs}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(parse_args(Config()))
