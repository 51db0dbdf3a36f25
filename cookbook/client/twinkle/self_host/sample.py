"""Sampling through the native client: the base model or a saved adapter, with per-token logprobs.

    TWINKLE_API_KEY=... python cookbook/client/twinkle/self_host/sample.py --prompt="who are you?"
    python .../sample.py --checkpoint=tinker://<run>/weights/<name>

Prints each completion with its stop reason (a per-token view where widgets are absent), the prompt's
logprobs, and a final ``RESULT {json}`` line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import twinkle_client
from twinkle.data import encode_prompt
from twinkle.types import SamplingParams
from twinkle_client.sampler import Sampler
from twinkle_client.widgets import SampleViewer


@dataclass
class Config:
    base_url: str = os.environ.get("TWINKLE_SERVER_URL", "http://127.0.0.1:8000")
    api_key: str = os.environ.get("TWINKLE_API_KEY", "")
    base_model: str = os.environ.get("TWINKLE_BASE_MODEL") or os.environ.get("TWINKLE_MODEL") or "builtin://tiny"
    checkpoint: str = ""  # a saved adapter (tinker://...); empty samples the base model
    prompt: str = "who are you?"
    num_samples: int = 3
    max_tokens: int = 24
    temperature: float = 0.8
    seed: int = 0


def parse_args(cfg: Config, argv: list[str]) -> Config:
    """``--name=value`` flags override the defaults above."""
    for arg in argv:
        key, _, value = arg.lstrip("-").partition("=")
        field = key.replace("-", "_")
        cfg = dataclasses.replace(cfg, **{field: type(getattr(cfg, field))(value)})
    return cfg


def main(cfg: Config) -> dict:
    with twinkle_client.init_twinkle_client(cfg.base_url, cfg.api_key or None):
        sampler = Sampler(base_model=cfg.base_model, checkpoint=cfg.checkpoint or None)
        tokenizer = sampler.get_tokenizer()
        prompt = encode_prompt(tokenizer, cfg.prompt)
        params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed)
        response = sampler.sample(prompt, params, num_samples=cfg.num_samples)
        SampleViewer(tokenizer).add_response(prompt, response)
        completions = []
        for seq in response.sequences:
            text = tokenizer.decode(seq.tokens, skip_special_tokens=True)
            completions.append({"text": text, "stop_reason": seq.stop_reason, "tokens": list(seq.tokens),
                                "logprobs": list(seq.logprobs or [])})
            print(f"[{seq.stop_reason}] {text!r}")
        logprobs = sampler.compute_logprobs(prompt)
        print("prompt logprobs:", " ".join("-" if lp is None else f"{lp:.2f}" for lp in logprobs))
    result = {"completions": completions, "prompt_logprobs": logprobs}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(parse_args(Config(), sys.argv[1:]))
