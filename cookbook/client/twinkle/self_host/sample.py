"""Sampling through the native client: base model vs a trained adapter, with per-token logprobs.

    python cookbook/client/twinkle/self_host/sample.py [tinker://<run>/sampler_weights/<name>]
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import twinkle_client
from twinkle.data import encode_prompt
from twinkle.types import SamplingParams
from twinkle_client.model import load_tokenizer
from twinkle_client.sampler import Sampler
from twinkle_client.widgets import SampleViewer


@dataclass
class Config:
    base_url: str = os.environ.get("TWINKLE_SERVER_URL", "http://127.0.0.1:8000")
    api_key: str | None = os.environ.get("TWINKLE_API_KEY")
    model_id: str | None = os.environ.get("TWINKLE_MODEL")
    checkpoint: str | None = sys.argv[1] if len(sys.argv) > 1 else None
    prompts: tuple[str, ...] = ("who are you?", "what is 3 + 4?")
    num_samples: int = 3
    max_tokens: int = 32
    temperature: float = 0.7


def main(cfg: Config) -> None:
    with twinkle_client.init_twinkle_client(cfg.base_url, cfg.api_key) as session:
        base = cfg.model_id or session.capabilities().base_models[0].name
        info = next(m for m in session.capabilities().base_models if m.name == base)
        tok = load_tokenizer(info.tokenizer_id or base)
        sampler = Sampler(base_model=base, checkpoint=cfg.checkpoint)
        viewer = SampleViewer(tok)
        params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=0)
        for prompt in cfg.prompts:
            ids = encode_prompt(tok, prompt)
            viewer.add_response(ids, sampler.sample(ids, params, num_samples=cfg.num_samples))
        lps = sampler.compute_logprobs(encode_prompt(tok, cfg.prompts[0]))
        print(f"prompt logprobs of {cfg.prompts[0]!r}: " + " ".join("-" if x is None else f"{x:.2f}" for x in lps))


if __name__ == "__main__":
    main(Config())
