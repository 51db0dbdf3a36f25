"""Remote mirror of ``twinkle.sampler.Sampler``: generation on the server with a run's live adapter weights,
a saved checkpoint, or the base model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from twinkle.types import InvalidInputError, ModelInput, SampleResponse, SamplingParams, TwinkleError

from ._futures import SUBMIT_WAIT_S, PostedFuture
from .model import RemoteModel
from .session import Session, current_session
from .tokenizer import load_tokenizer_from_candidates

__all__ = ["Sampler"]


class Sampler:
    """``Sampler(model)`` samples with the model's current adapter (its weights at the time of each call);
    ``Sampler(checkpoint="tinker://...")`` with a saved adapter; ``Sampler(base_model=...)`` with none."""

    def __init__(
        self, model: RemoteModel | None = None, *, adapter_name: str | None = None, checkpoint: str | None = None,
        base_model: str | None = None, session: Session | None = None,
    ):
        self.model = model
        self.adapter_name = adapter_name
        self.checkpoint = checkpoint
        self.session = session or (model.session if model is not None else current_session())
        if model is not None:
            self.base_model = model.model_id
        elif base_model is not None:
            self.base_model = base_model
        else:
            models = self.session.capabilities().base_models
            if not models:
                raise InvalidInputError("the server hosts no base model", field="base_model")
            self.base_model = models[0].name
        self._tokenizer: Any = None

    # ---- tokens ---------------------------------------------------------------------------------------------
    def get_tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.model is not None:
                self._tokenizer = self.model.get_tokenizer()
            else:
                info = next((m for m in self.session.capabilities().base_models if m.name == self.base_model), None)
                self._tokenizer = load_tokenizer_from_candidates(
                    [info.tokenizer_id if info else None, self.base_model],
                    vocab_size=info.vocab_size if info else None)
        return self._tokenizer

    def _prompt(self, prompt: Any) -> ModelInput:
        if isinstance(prompt, ModelInput):
            return prompt
        if isinstance(prompt, str):
            return ModelInput.from_ints(self.get_tokenizer().encode(prompt, add_special_tokens=False))
        try:
            return ModelInput.from_ints(list(prompt))
        except (TypeError, ValueError):
            raise InvalidInputError("prompt must be token ids, a ModelInput or a string", field="prompt") from None

    # ---- sampling -------------------------------------------------------------------------------------------
    def sample_async(
        self, prompt: Any, sampling_params: SamplingParams | dict[str, Any] | None = None, num_samples: int = 1,
        prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0,
    ) -> PostedFuture[SampleResponse]:
        """Start a sample and return its future at once: the request is POSTed on a background thread, so a list
        of ``sample_async`` calls reaches the server together (one decode batch) instead of one round trip
        after another. A later training call of the session is sent only after these were accepted, so a
        sample asked before an ``optim_step`` still uses the weights before it."""
        return self._sample(prompt, sampling_params, num_samples, prompt_logprobs, topk_prompt_logprobs,
                            wait="background")

    def _sample(self, prompt: Any, sampling_params: SamplingParams | dict[str, Any] | None, num_samples: int,
                prompt_logprobs: bool, topk_prompt_logprobs: int, *, wait: bool | str = False) -> Any:
        params = sampling_params if isinstance(sampling_params, SamplingParams) else SamplingParams(**(sampling_params or {}))
        body: dict[str, Any] = {
            "base_model": self.base_model,
            "prompt": self._prompt(prompt).model_dump(mode="json"),
            "num_samples": num_samples,
            "sampling_params": params.model_dump(exclude_none=True),
            "prompt_logprobs": prompt_logprobs,
            "topk_prompt_logprobs": topk_prompt_logprobs,
            "session_id": self.session.session_id,  # the panel's Stop reaches a loop that only samples
        }
        if self.checkpoint is not None:
            body["checkpoint"] = self.checkpoint
        elif self.model is not None:
            body["run_id"] = self.model._adapter(self.adapter_name).run_id
        if wait == "async":
            return self._aresult(body)
        if wait == "background":
            return self.session.submit_in_background("sample", body, SampleResponse.model_validate, "sample")
        return self.session.submit("sample", body, SampleResponse.model_validate, "sample",
                                   wait=SUBMIT_WAIT_S if wait else 0.0)

    async def _aresult(self, body: dict[str, Any]) -> SampleResponse:
        fut = await self.session.aio.submit("sample", body, SampleResponse.model_validate, "sample",
                                            wait=SUBMIT_WAIT_S)
        return await fut

    async def asample(
        self, prompt: Any, sampling_params: SamplingParams | dict[str, Any] | None = None, num_samples: int = 1,
        prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0,
    ) -> SampleResponse:
        """``sample`` without blocking the event loop."""
        return await self._sample(prompt, sampling_params, num_samples, prompt_logprobs, topk_prompt_logprobs,
                                  wait="async")

    def sample(
        self, prompt: Any, sampling_params: SamplingParams | dict[str, Any] | None = None, num_samples: int = 1,
        prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0,
    ) -> SampleResponse:
        return self._sample(prompt, sampling_params, num_samples, prompt_logprobs, topk_prompt_logprobs,
                            wait=True).result()

    def stream(
        self, prompt: Any, sampling_params: SamplingParams | dict[str, Any] | None = None, num_samples: int = 1,
        topk_logprobs: int = 0,
    ) -> Iterator[dict[str, Any]]:
        """Sample with server-sent events: yields ``{"index", "token", "logprob", "text"}`` per token as it is
        produced (with ``topk_logprobs = k``, also ``"top"``: the k most likely ``[token, text, logprob]`` there),
        then ``{"done": SampleResponse}``."""
        from ._errors import error_from_response

        params = sampling_params if isinstance(sampling_params, SamplingParams) else SamplingParams(**(sampling_params or {}))
        body: dict[str, Any] = {"base_model": self.base_model, "prompt": self._prompt(prompt).model_dump(mode="json"),
                                "num_samples": num_samples, "sampling_params": params.model_dump(exclude_none=True)}
        if topk_logprobs:
            body["topk_logprobs"] = topk_logprobs
        if self.checkpoint is not None:
            body["checkpoint"] = self.checkpoint
        elif self.model is not None:
            body["run_id"] = self.model._adapter(self.adapter_name).run_id
        http = self.session.http
        with http._client.stream("POST", "/api/v1/twinkle/sample/stream", json=body) as r:
            if r.status_code >= 400:
                r.read()
                raise error_from_response(r)
            event = ""
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if event == "token":
                        yield data
                    elif event == "done":
                        yield {"done": SampleResponse.model_validate(data)}
                    elif event == "error":
                        raise TwinkleError(data.get("error", "sampling failed"))

    def compute_logprobs(self, prompt: Any) -> list[float | None]:
        """Log-probability of each prompt token given the ones before it: ``[None, lp1, lp2, ...]``."""
        resp = self.sample(prompt, SamplingParams(max_tokens=1, temperature=0.0), 1, prompt_logprobs=True)
        return list(resp.prompt_logprobs or [])

    def generate(
        self, prompt: str | list[dict[str, Any]], *, max_tokens: int = 64, temperature: float = 0.0,
        top_p: float = 1.0, top_k: int = -1, seed: int | None = None, system: str | None = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """Chat-style generation: the chat template is applied to ``prompt`` and the reply decoded.
        ``stream=True``: an iterator of text pieces as the server produces them."""
        tok = self.get_tokenizer()
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system:
            messages = [{"role": "system", "content": system}, *messages]
        from .images import has_image_parts, render_chat, vision_info

        if has_image_parts(messages):  # {"type": "image", "image": PIL | bytes | path} parts
            ids = render_chat(messages, tok, vision_info(self.session, self.base_model))
        elif getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
            ids = tok.encode(text, add_special_tokens=False)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        prompt_in = ids if isinstance(ids, ModelInput) else list(ids)
        if stream:
            return (ev["text"] for ev in self.stream(prompt_in, params) if "text" in ev and ev["text"])
        seq = self.sample(prompt_in, params).sequences[0]
        toks = list(seq.tokens)
        eos = getattr(tok, "eos_token_id", None)
        if seq.stop_reason == "stop" and toks and eos is not None and toks[-1] == eos:
            toks = toks[:-1]
        return tok.decode(toks, skip_special_tokens=True)

    def __repr__(self) -> str:
        src = self.checkpoint or (self.model.run_id if self.model is not None else "base")
        return f"Sampler(base_model={self.base_model!r}, weights={src!r})"
