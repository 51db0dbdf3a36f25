"""``Sampler``: sample from a local model's adapter (see ``docs/local-api.md``)."""

from __future__ import annotations

from typing import Any

from twinkle.model.base import SampleItem
from twinkle.types import InvalidInputError, ModelInput, SampleResponse, SamplingParams


class Sampler:
    """Samples with ``model``'s current adapter weights (or ``adapter_name``; ``None`` with no adapter = base)."""

    def __init__(self, model: Any, adapter_name: str | None = None) -> None:
        self.model = model
        self.adapter_name = adapter_name

    def _adapter(self, adapter_name: str | None) -> str | None:
        return adapter_name or self.adapter_name or getattr(self.model, "current_adapter", None)

    @staticmethod
    def _tokens(prompt: Any) -> list[int]:
        if isinstance(prompt, ModelInput):
            return prompt.to_ints()
        if hasattr(prompt, "tolist"):
            prompt = prompt.tolist()
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return [int(t) for t in prompt]
        raise InvalidInputError("prompt must be a list of token ids or a ModelInput", field="prompt")

    def sample(self, prompt: Any, sampling_params: SamplingParams | None = None, num_samples: int = 1, *,
               prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0,
               adapter_name: str | None = None) -> SampleResponse:
        item = SampleItem(self._adapter(adapter_name), self._tokens(prompt), num_samples,
                          sampling_params or SamplingParams(), prompt_logprobs, topk_prompt_logprobs)
        return self.model.backend.sample([item])[0]

    def generate(self, prompt: str | list[dict[str, str]], *, max_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = -1, top_p: float = 1.0, seed: int | None = None, adapter_name: str | None = None,
                 chat: bool = True) -> str:
        """Text in, text out: the chat template is applied (``chat=False``: raw text) and EOS stops."""
        tok = self.model.get_tokenizer()
        if tok is None:
            raise InvalidInputError("this model has no tokenizer", field="prompt")
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        elif isinstance(prompt, str):
            ids = tok.encode(prompt)
        else:
            raise InvalidInputError("with chat=False the prompt must be a string", field="prompt")
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        seq = self.sample(list(ids), params, adapter_name=adapter_name).sequences[0]
        toks = seq.tokens
        eos = set(self.model.model_info().eos_token_ids)
        if seq.stop_reason == "stop" and toks and toks[-1] in eos:
            toks = toks[:-1]
        return tok.decode(toks, skip_special_tokens=True)

    def compute_logprobs(self, prompt: Any, *, adapter_name: str | None = None) -> list[float | None]:
        """Logprob of each prompt token given the ones before it: ``[None, lp1, lp2, ...]``."""
        resp = self.sample(prompt, SamplingParams(max_tokens=1, temperature=0.0), prompt_logprobs=True,
                           adapter_name=adapter_name)
        return list(resp.prompt_logprobs or [])
