"""``MockBackend``: the whole ``Backend`` contract on a small numpy language model that really learns.

Import-light (numpy + pydantic only), so clients can be developed on a laptop without torch. The model and
its backward pass live in ``_net``, the losses in the registry (``twinkle.loss``, numpy side); this module holds adapters, optimizer state,
validation, sampling and checkpoints with the same semantics as the transformers backend.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twinkle.loss import LossSpec, check_finite_loss, get_loss, nonfinite_gradient_error
from twinkle.model.base import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CHECKPOINT_META,
    Backend,
    BatchItem,
    SampleItem,
)
from twinkle.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    InvalidInputError,
    LoraConfig,
    LRSchedulerConfig,
    ModelInfo,
    NotFoundError,
    OptimizerConfig,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    TensorData,
)
from twinkle.types.params import DEFAULT_MAX_TOKENS

from ._net import MODULES, BaseNet, LoraWeights, MockSpec, log_softmax, new_cache
from ._safetensors import load_file, save_file
from .tokenizer import ByteTokenizer

TRAINING_STATE = "training_state.npz"
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"embed_dim": 32, "hidden_dim": 128},
    "small": {"embed_dim": 64, "hidden_dim": 256},
}
# Module names of real transformer models map onto the mock's three projections, so LoRA configs written
# for a real model work unchanged.
_ALIASES: dict[str, str] = {
    **{n: "ctx_proj" for n in ("ctx_proj", "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "c_proj", "self_attn", "attn")},
    **{n: "mlp_proj" for n in ("mlp_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2", "mlp", "w1", "w2", "w3")},
    **{n: "lm_head" for n in ("lm_head", "unembed", "embed_out", "output")},
}
_PEFT_PREFIX = "base_model.model."


@dataclass
class _Adapter:
    config: LoraConfig
    lora: LoraWeights
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    step: int = 0
    grads: dict[str, np.ndarray] = field(default_factory=dict)
    exp_avg: dict[str, np.ndarray] = field(default_factory=dict)
    exp_avg_sq: dict[str, np.ndarray] = field(default_factory=dict)
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))

    def zero_grads(self) -> None:
        self.grads = {k: np.zeros_like(v) for k, v in self.lora.flat().items()}


@dataclass
class _Row:
    """One validated datum of one batch item."""

    item: int
    tokens: np.ndarray
    targets: np.ndarray  # (N,) or (N, K)
    inputs: dict[str, np.ndarray]


class MockBackend(Backend):
    """A small numpy LM (byte tokenizer, frozen random base, LoRA on three projections) with real gradients.

    ``model_id`` ``mock://tiny`` or ``mock://small`` picks a preset; any other id runs the tiny preset under
    that name (so a client written for a real model runs unchanged). Keyword options override the sizes.
    Everything is deterministic given ``seed``.
    """

    name = "mock"

    def __init__(
        self,
        model_id: str = "mock://tiny",
        *,
        seed: int = 0,
        vocab_size: int | None = None,
        embed_dim: int | None = None,
        hidden_dim: int | None = None,
        decays: tuple[float, ...] | None = None,
        max_length: int = 1024,
    ) -> None:
        preset_name = model_id[len("mock://"):] if model_id.startswith("mock://") else "tiny"
        if preset_name not in PRESETS:
            raise InvalidInputError(
                f"unknown mock model {model_id!r}; choose one of {sorted('mock://' + p for p in PRESETS)}",
                field="model_id",
            )
        sizes = dict(PRESETS[preset_name])
        if embed_dim is not None:
            sizes["embed_dim"] = int(embed_dim)
        if hidden_dim is not None:
            sizes["hidden_dim"] = int(hidden_dim)
        if decays is not None:
            sizes["decays"] = tuple(decays)
        base_vocab = 260
        vocab = base_vocab if vocab_size is None else int(vocab_size)
        if vocab < base_vocab:
            raise InvalidInputError(f"vocab_size must be at least {base_vocab} (bytes + specials)", field="vocab_size")
        if max_length < 2:
            raise InvalidInputError("max_length must be at least 2", field="max_length")
        self.model_id = model_id
        self.seed = int(seed)
        self.spec = MockSpec(vocab_size=vocab, max_length=int(max_length), seed=self.seed, **sizes)
        self.net = BaseNet(self.spec)
        self._tokenizer = ByteTokenizer(model_max_length=self.spec.max_length, extra_tokens=vocab - base_vocab)
        self._eos_ids = [self._tokenizer.eos_token_id, self._tokenizer.convert_tokens_to_ids("<|endoftext|>")]
        self._adapters: dict[str, _Adapter] = {}
        self._sample_rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x5A3]))

    # -- model ---------------------------------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        return ModelInfo(
            model_name=self.model_id,
            backend="mock",
            arch="mock-byte-lm",
            vocab_size=self.spec.vocab_size,
            max_length=self.spec.max_length,
            tokenizer_id=ByteTokenizer.name_or_path,
            eos_token_ids=list(self._eos_ids),
            num_parameters=self.net.num_parameters,
        )

    def tokenizer(self) -> ByteTokenizer:
        return self._tokenizer

    # -- adapters -----------------------------------------------------------------------------------------
    def add_adapter(self, adapter: str, config: LoraConfig) -> None:
        _check_name(adapter)
        if adapter in self._adapters:
            raise InvalidInputError(f"adapter {adapter!r} already exists", field="adapter")
        self._adapters[adapter] = self._new_adapter(config, self.seed if config.seed is None else config.seed)

    def _new_adapter(self, config: LoraConfig, seed: int) -> _Adapter:
        modules = self._target_modules(config)
        rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x10AA]))
        params = {}
        for m in modules:
            n_in, n_out = self.spec.module_shape(m)
            bound = 1.0 / math.sqrt(n_in)  # peft's kaiming_uniform(a=sqrt(5)) bound
            params[m] = (rng.uniform(-bound, bound, (n_in, config.rank)), np.zeros((config.rank, n_out)))
        lora = LoraWeights(scale=config.lora_alpha / config.rank, params=params, dropout=config.dropout)
        state = _Adapter(config=config.model_copy(deep=True), lora=lora, rng=np.random.default_rng(rng.integers(2**63)))
        state.zero_grads()
        return state

    @staticmethod
    def _target_modules(config: LoraConfig) -> list[str]:
        target = config.target_modules
        if target is None or target == "all-linear":
            flags = {"ctx_proj": config.train_attn, "mlp_proj": config.train_mlp, "lm_head": config.train_unembed}
            chosen = [m for m in MODULES if flags[m]]
        else:
            names = [target] if isinstance(target, str) else list(target)
            wanted = {_ALIASES.get(str(n).rsplit(".", 1)[-1]) for n in names}
            chosen = [m for m in MODULES if m in wanted]
        if not chosen:
            raise InvalidInputError(
                f"LoRA config selects no module of the mock model (modules: {list(MODULES)})", field="target_modules"
            )
        return chosen

    def remove_adapter(self, adapter: str) -> None:
        self._get(adapter)
        del self._adapters[adapter]

    def list_adapters(self) -> list[str]:
        return list(self._adapters)

    def adapter_config(self, adapter: str) -> LoraConfig:
        return self._get(adapter).config.model_copy(deep=True)

    def set_optimizer(self, adapter: str, config: OptimizerConfig) -> None:
        self._get(adapter).optimizer = config.model_copy(deep=True)

    def set_lr_scheduler(self, adapter: str, config: LRSchedulerConfig) -> None:
        self._get(adapter).scheduler = config.model_copy(deep=True)

    def step_count(self, adapter: str) -> int:
        return self._get(adapter).step

    def grad_snapshot(self, adapter: str) -> dict[str, np.ndarray]:
        """A copy of ``adapter``'s accumulated gradients (the scheduler restores it if a micro-batch fails)."""
        return {k: v.copy() for k, v in self._get(adapter).grads.items()}

    def grad_restore(self, adapter: str, saved: dict[str, np.ndarray]) -> None:
        self._get(adapter).grads = saved

    def _get(self, adapter: str | None) -> _Adapter:
        if adapter is None or adapter not in self._adapters:
            raise NotFoundError(f"adapter {adapter!r} not found", field="adapter")
        return self._adapters[adapter]

    # -- validation ----------------------------------------------------------------------------------------
    def _check_tokens(self, tokens: list[int], where: str, token_field: str | None = None) -> np.ndarray:
        arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if arr.size == 0:
            raise InvalidInputError(f"{where} is empty", field=where)
        if arr.size > self.spec.max_length:
            raise InvalidInputError(
                f"{where} has {arr.size} tokens, more than the model's max_length {self.spec.max_length}", field=where
            )
        bad = (arr < 0) | (arr >= self.spec.vocab_size)
        if bad.any():
            raise InvalidInputError(
                f"{where} holds token id {int(arr[bad][0])} outside the vocabulary [0, {self.spec.vocab_size})",
                field=token_field or where,
            )
        return arr

    def _validate_item(self, k: int, item: BatchItem) -> list[_Row]:
        if item.adapter is None:
            if not item.forward_only:
                raise InvalidInputError("training needs an adapter (adapter=None is the frozen base)", field="adapter")
        else:
            self._get(item.adapter)
        spec = get_loss(item.loss_fn)
        spec.resolve_config(item.loss_fn_config)
        if not item.data:
            raise InvalidInputError("data is empty", field="data")
        if spec.paired and len(item.data) % 2:
            raise InvalidInputError(
                f"loss_fn {spec.name!r} takes datums in (chosen, rejected) pairs; got {len(item.data)}", field="data"
            )
        rows = []
        for i, datum in enumerate(item.data):
            rows.append(self._validate_datum(k, i, datum, spec))
        return rows

    def _validate_datum(self, k: int, i: int, datum: Datum, spec: LossSpec) -> _Row:
        where = f"data[{i}]"
        if not isinstance(datum, Datum):
            raise InvalidInputError(f"{where} must be a Datum", field=where)
        tokens = self._check_tokens(datum.model_input.to_ints(), f"{where}.model_input", f"{where}.model_input.tokens")
        n = tokens.size
        inputs: dict[str, np.ndarray] = {}
        for key in spec.required_inputs:
            if key not in datum.loss_fn_inputs:
                raise InvalidInputError(f"{where} lacks loss_fn_inputs[{key!r}]", field=f"{where}.loss_fn_inputs.{key}")
        for key, td in datum.loss_fn_inputs.items():
            arr = td.to_numpy()
            if arr.ndim == 0 or arr.shape[0] != n or arr.ndim > 2:
                raise InvalidInputError(
                    f"{where}.loss_fn_inputs[{key!r}] has shape {list(arr.shape)} but model_input has {n} tokens",
                    field=f"{where}.loss_fn_inputs.{key}",
                )
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise InvalidInputError(f"{where}.loss_fn_inputs[{key!r}] is not finite", field=f"{where}.loss_fn_inputs.{key}")
            inputs[key] = arr.astype(np.float64) if key in spec.inputs and key != "target_tokens" else arr
        targets = inputs.get("target_tokens")
        if targets is None:
            raise InvalidInputError(f"{where} lacks loss_fn_inputs['target_tokens']", field=f"{where}.loss_fn_inputs.target_tokens")
        targets = targets.astype(np.int64)
        if ((targets < 0) | (targets >= self.spec.vocab_size)).any():
            raise InvalidInputError(
                f"{where}.loss_fn_inputs['target_tokens'] holds ids outside the vocabulary (size {self.spec.vocab_size})",
                field=f"{where}.loss_fn_inputs.target_tokens",
            )
        for key, arr in inputs.items():
            if key != "target_tokens" and arr.shape != targets.shape and arr.size != targets.size:
                raise InvalidInputError(
                    f"{where}.loss_fn_inputs[{key!r}] has shape {list(arr.shape)}, target_tokens {list(targets.shape)}",
                    field=f"{where}.loss_fn_inputs.{key}",
                )
        return _Row(item=k, tokens=tokens, targets=targets, inputs=inputs)

    # -- compute -------------------------------------------------------------------------------------------
    def run_batch(self, items: list[BatchItem]) -> list[ForwardBackwardOutput]:
        if not isinstance(items, list) or not items:
            raise InvalidInputError("a batch needs at least one item", field="data")
        rows_per_item = [self._validate_item(k, item) for k, item in enumerate(items)]  # before any change
        lps: list[list[np.ndarray]] = [[np.empty(0)] * len(r) for r in rows_per_item]
        cache_of: dict[tuple[str | None, bool], Any] = {}
        # One forward per (adapter, trains) group over all its rows, in order of first appearance.
        groups: dict[tuple[str | None, bool], list[tuple[int, int]]] = {}
        for k, item in enumerate(items):
            key = (item.adapter, not item.forward_only)
            groups.setdefault(key, []).extend((k, i) for i in range(len(rows_per_item[k])))
        for key, members in groups.items():
            adapter, trains = key
            state = None if adapter is None else self._adapters[adapter]
            rows = [rows_per_item[k][i] for k, i in members]
            feats = self.net.features([r.tokens for r in rows])
            cache = new_cache() if trains else None
            logits = self.net.forward(np.concatenate(feats), None if state is None else state.lora,
                                      cache=cache, rng=state.rng if (trains and state is not None) else None)
            logp = log_softmax(logits)
            offsets = np.cumsum([0] + [len(f) for f in feats])
            for (k, i), row, start in zip(members, rows, offsets[:-1], strict=True):
                lps[k][i] = _gather(logp[start : start + len(row.tokens)], row.targets)
            cache_of[key] = (cache, logp, offsets, members)
        # Losses and dLoss/dlogprobs per item.
        outputs: list[ForwardBackwardOutput] = []
        dlps: list[list[np.ndarray]] = []
        for k, item in enumerate(items):
            rows = rows_per_item[k]
            spec = get_loss(item.loss_fn)
            cfg = spec.resolve_config(item.loss_fn_config)
            inputs = [dict(r.inputs) for r in rows]
            if spec.needs_reference:
                refs = self._reference_logprobs(rows, lps[k] if item.adapter is None else None)
                for inp, ref in zip(inputs, refs, strict=True):
                    inp["ref_logprobs"] = ref
            result = spec.numpy_fn(lps[k], inputs, cfg)
            check_finite_loss(spec.name, float(result.loss))  # before any gradient is kept; a forward too
            dlps.append([np.asarray(g, dtype=np.float64).reshape(lp.shape) for g, lp in zip(result.grads, lps[k], strict=True)])
            outputs.append(ForwardBackwardOutput(
                loss_fn_outputs=[{"logprobs": TensorData.from_numpy(lp.astype(np.float32))} for lp in lps[k]],
                metrics={"loss:sum": float(result.loss), **{m: float(v) for m, v in result.metrics.items()}},
            ))
        # Backward per training group; gradients are added to the accumulators only at the very end.
        pending: list[tuple[_Adapter, dict[str, np.ndarray]]] = []
        for key, (cache, logp, offsets, members) in cache_of.items():
            adapter, trains = key
            if not trains or adapter is None:
                continue
            probs = np.exp(logp)
            dlogits = np.zeros_like(logp)
            for (k, i), start in zip(members, offsets[:-1], strict=True):
                row, g = rows_per_item[k][i], dlps[k][i]
                n = len(row.tokens)
                g2 = g.reshape(n, -1)
                t2 = row.targets.reshape(n, -1)
                block = -probs[start : start + n] * g2.sum(axis=1, keepdims=True)
                np.add.at(block, (np.repeat(np.arange(n), t2.shape[1]), t2.reshape(-1)), g2.reshape(-1))
                dlogits[start : start + n] = block
            state = self._adapters[adapter]
            pending.append((state, self.net.backward(cache, dlogits, state.lora)))
        for state, grads in pending:
            for name, g in grads.items():
                state.grads[name] += g
        return outputs

    def _reference_logprobs(self, rows: list[_Row], base: list[np.ndarray] | None) -> list[np.ndarray]:
        """A reference loss's ``ref_logprobs``: the datum's own when given, else the base model's logprobs."""
        if all("ref_logprobs" in r.inputs for r in rows):
            return [r.inputs["ref_logprobs"].astype(np.float64).reshape(r.targets.shape) for r in rows]
        if base is None:
            feats = self.net.features([r.tokens for r in rows])
            base = [_gather(log_softmax(self.net.forward(f, None)), r.targets) for f, r in zip(feats, rows, strict=True)]
        return [
            r.inputs["ref_logprobs"].astype(np.float64).reshape(r.targets.shape) if "ref_logprobs" in r.inputs else b
            for r, b in zip(rows, base, strict=True)
        ]

    def optim_step(self, adapter: str, params: AdamParams | None = None) -> dict[str, float]:
        state = self._get(adapter)
        opt = state.optimizer
        if params is not None:
            name, lr = "adamw", params.learning_rate
            b1, b2, eps, wd, clip = params.beta1, params.beta2, params.eps, params.weight_decay, params.grad_clip_norm
        else:
            name, lr = opt.name, opt.lr * state.scheduler.factor(state.step)
            (b1, b2), eps, wd, clip = opt.betas, opt.eps, opt.weight_decay, opt.grad_clip_norm
        grads = state.grads
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
        if not math.isfinite(norm):  # not applied: weights and optimizer state stay bit-identical
            state.zero_grads()
            raise nonfinite_gradient_error(norm)
        coef = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
        step = state.step + 1
        for key, p in state.lora.flat().items():
            g = grads[key] * coef
            if name == "sgd":
                g = g + wd * p
                if opt.momentum:
                    buf = state.exp_avg.get(key)
                    buf = g.copy() if buf is None else opt.momentum * buf + g
                    state.exp_avg[key] = buf
                    g = buf
                p -= lr * g
                continue
            if name == "adamw":
                p *= 1.0 - lr * wd
            elif wd:
                g = g + wd * p
            m, v = state.exp_avg.get(key), state.exp_avg_sq.get(key)
            m = (1.0 - b1) * g if m is None else m * b1 + (1.0 - b1) * g
            v = (1.0 - b2) * g * g if v is None else v * b2 + (1.0 - b2) * g * g
            state.exp_avg[key], state.exp_avg_sq[key] = m, v
            denom = np.sqrt(v) / math.sqrt(1.0 - b2**step) + eps
            p -= (lr / (1.0 - b1**step)) * m / denom
        state.step = step
        state.zero_grads()
        return {"grad_norm:mean": norm, "lr:mean": float(lr), "step:max": float(step)}

    # -- sampling ------------------------------------------------------------------------------------------
    def sample(self, items: list[SampleItem]) -> list[SampleResponse]:
        if not items:
            raise InvalidInputError("no sampling request", field="prompt")
        prepared = [self._validate_sample(item) for item in items]
        return [self._sample_one(item, prompt) for item, prompt in zip(items, prepared, strict=True)]

    def _validate_sample(self, item: SampleItem) -> np.ndarray:
        if item.adapter is not None:
            self._get(item.adapter)
        prompt = self._check_tokens(list(item.prompt), "prompt")
        if prompt.size >= self.spec.max_length:
            raise InvalidInputError(f"prompt is longer than the model's {self.spec.max_length - 1}", field="prompt")
        if item.num_samples < 1:
            raise InvalidInputError("num_samples must be at least 1", field="num_samples")
        if item.topk_prompt_logprobs < 0:
            raise InvalidInputError("topk_prompt_logprobs must be >= 0", field="topk_prompt_logprobs")
        _stops(item.params, self._eos_ids, self.spec.vocab_size)
        return prompt

    def _sample_one(self, item: SampleItem, prompt: np.ndarray) -> SampleResponse:
        params = item.params
        lora = None if item.adapter is None else self._adapters[item.adapter].lora
        stop_tokens, stop_strings = _stops(params, self._eos_ids, self.spec.vocab_size)
        rng = self._sample_rng if params.seed is None else np.random.default_rng(params.seed)
        logp_prompt = log_softmax(self.net.forward(self.net.features([prompt])[0], lora))
        n = item.num_samples
        room = self.spec.max_length - prompt.size
        max_tokens = min(room, DEFAULT_MAX_TOKENS) if params.max_tokens is None else min(room, params.max_tokens)
        state = self.net.init_state(1)
        for tok in prompt:
            self.net.step_features(state, np.asarray([tok]))
        state = {k: np.repeat(v, n, axis=0) for k, v in state.items()}
        logp = np.repeat(logp_prompt[-1:], n, axis=0)
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        done = np.zeros(n, dtype=bool)
        reasons = ["length"] * n
        for t in range(max_tokens):
            chosen = _choose(logp, params, rng)
            for j in np.flatnonzero(~done):
                tok = int(chosen[j])
                tokens[j].append(tok)
                logprobs[j].append(float(logp[j, tok]))
                if tok in stop_tokens or (stop_strings and _ends_with_stop(self._tokenizer, tokens[j], stop_strings)):
                    done[j], reasons[j] = True, "stop"
            if done.all() or t == max_tokens - 1:
                break
            u = self.net.step_features(state, chosen)
            logp = log_softmax(self.net.forward(u, lora))
        response = SampleResponse(
            sequences=[SampledSequence(stop_reason=r, tokens=s, logprobs=lp) for r, s, lp in zip(reasons, tokens, logprobs, strict=True)]
        )
        if item.prompt_logprobs or item.topk_prompt_logprobs:
            scored = [float(logp_prompt[i - 1, prompt[i]]) for i in range(1, prompt.size)]
            response.prompt_logprobs = [None, *scored]
        if item.topk_prompt_logprobs:
            k = min(item.topk_prompt_logprobs, self.spec.vocab_size)
            top: list[list[tuple[int, float]] | None] = [None]
            for i in range(1, prompt.size):
                row = logp_prompt[i - 1]
                idx = np.argsort(-row, kind="stable")[:k]
                top.append([(int(j), float(row[j])) for j in idx])
            response.topk_prompt_logprobs = top
        return response

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save(self, adapter: str, path: Path, *, optimizer: bool = True) -> None:
        state = self._get(adapter)
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InvalidInputError(f"{str(path)!r} exists and is not a directory", field="path")
        path.mkdir(parents=True, exist_ok=True)
        cfg = state.config
        tensors: dict[str, np.ndarray] = {}
        for m, (a, b) in state.lora.params.items():
            tensors[f"{_PEFT_PREFIX}{m}.lora_A.weight"] = np.ascontiguousarray(a.T)
            tensors[f"{_PEFT_PREFIX}{m}.lora_B.weight"] = np.ascontiguousarray(b.T)
        peft_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.model_id,
            "r": cfg.rank,
            "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.dropout,
            "target_modules": list(state.lora.params),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
        }
        meta = {
            "base_model": self.model_id,
            "lora": cfg.model_dump(mode="json"),
            "step": state.step,
            "backend": "mock",
            "mock_spec": asdict(self.spec),
        }
        _atomic(path / ADAPTER_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        _atomic(path / ADAPTER_CONFIG, lambda p: p.write_text(json.dumps(peft_config, indent=2)))
        if optimizer:
            _atomic(path / TRAINING_STATE, lambda p: _write_state(state, p))
        elif (path / TRAINING_STATE).exists():
            (path / TRAINING_STATE).unlink()  # it would not match the new weights
        _atomic(path / CHECKPOINT_META, lambda p: p.write_text(json.dumps(meta, indent=2)))

    def load(self, adapter: str, path: Path, *, optimizer: bool = True) -> LoraConfig:
        _check_name(adapter)
        path = Path(path)
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise NotFoundError(f"no checkpoint at {str(path)!r} ({ADAPTER_WEIGHTS} missing)", field="path")
        config = _read_lora_config(path)
        fresh = self._new_adapter(config, 0)
        tensors = load_file(path / ADAPTER_WEIGHTS)
        params = {}
        for m, (a0, b0) in fresh.lora.params.items():
            a = tensors.get(f"{_PEFT_PREFIX}{m}.lora_A.weight")
            b = tensors.get(f"{_PEFT_PREFIX}{m}.lora_B.weight")
            if a is None or b is None or a.T.shape != a0.shape or b.T.shape != b0.shape:
                raise InvalidInputError(
                    f"checkpoint at {str(path)!r} does not fit this mock model (module {m})", field="path"
                )
            params[m] = (a.T.astype(np.float64).copy(), b.T.astype(np.float64).copy())
        fresh.lora.params = params
        fresh.zero_grads()
        old = self._adapters.get(adapter)
        if optimizer and (path / TRAINING_STATE).is_file():
            _read_state(fresh, path / TRAINING_STATE)
        elif old is not None:
            fresh.optimizer, fresh.scheduler = old.optimizer, old.scheduler
        self._adapters[adapter] = fresh
        return config.model_copy(deep=True)

    def close(self) -> None:
        self._adapters.clear()


# -- helpers ---------------------------------------------------------------------------------------------------
def _check_name(adapter: Any) -> None:
    if not isinstance(adapter, str) or not adapter:
        raise InvalidInputError("adapter name must be a non-empty string", field="adapter")


def _gather(logp: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Logprobs of ``targets`` ((N,) or (N, K)) from per-position log-softmax rows (N, V)."""
    n = len(logp)
    if targets.ndim == 1:
        return logp[np.arange(n), targets]
    return np.take_along_axis(logp, targets.reshape(n, -1), axis=1).reshape(targets.shape)


def _stops(params: SamplingParams, eos_ids: list[int], vocab: int) -> tuple[set[int], list[str]]:
    """None: stop at EOS; ``[]``: no stop; strings / token ids: stops added to EOS (as the torch engine)."""
    stop = params.stop
    if stop is None:
        return set(eos_ids), []
    items = [stop] if isinstance(stop, str) else list(stop)
    if not items:
        return set(), []
    tokens: set[int] = set(eos_ids)
    strings: list[str] = []
    for s in items:
        if isinstance(s, str):
            if s:
                strings.append(s)
        elif isinstance(s, int) and not isinstance(s, bool) and 0 <= s < vocab:
            tokens.add(int(s))
        else:
            raise InvalidInputError(f"stop entry {s!r} is neither a string nor a token id", field="sampling_params.stop")
    return tokens, strings


def _ends_with_stop(tokenizer: ByteTokenizer, tokens: list[int], stops: list[str]) -> bool:
    text = tokenizer.decode(tokens)
    return any(s in text for s in stops)


def _choose(logp: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """One token per row: greedy at temperature 0, else temperature → top-k → top-p sampling."""
    if params.temperature == 0.0:
        return logp.argmax(axis=1)
    z = logp / params.temperature
    vocab = z.shape[1]
    if 0 < params.top_k < vocab:
        kth = np.partition(z, vocab - params.top_k, axis=1)[:, vocab - params.top_k][:, None]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    if params.top_p < 1.0:
        order = np.argsort(-p, axis=1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=1)
        before = np.cumsum(sorted_p, axis=1) - sorted_p  # mass strictly above each token
        keep_sorted = before < params.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=1, keepdims=True)
    cdf = np.cumsum(p, axis=1)
    u = rng.random(len(p))[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=1), vocab - 1)


def _atomic(target: Path, write: Any) -> None:
    tmp = target.with_name(target.name + ".tmp")
    write(tmp)
    os.replace(tmp, target)


def _write_state(state: _Adapter, path: Path) -> None:
    arrays: dict[str, Any] = {}  # name -> np.ndarray (Any: np.savez's stub types its **kwds as allow_pickle's bool)
    for prefix, store in (("exp_avg", state.exp_avg), ("exp_avg_sq", state.exp_avg_sq), ("grad", state.grads)):
        for k, v in store.items():
            arrays[f"{prefix}/{k}"] = v
    info = {
        "step": state.step,
        "optimizer": state.optimizer.model_dump(mode="json"),
        "scheduler": state.scheduler.model_dump(mode="json"),
        "rng": state.rng.bit_generator.state,
    }
    arrays["info"] = np.asarray(json.dumps(info))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _read_state(state: _Adapter, path: Path) -> None:
    with np.load(path, allow_pickle=False) as z:
        info = json.loads(str(z["info"]))
        stores: dict[str, dict[str, np.ndarray]] = {"exp_avg": {}, "exp_avg_sq": {}, "grad": {}}
        for key in z.files:
            if "/" in key:
                prefix, name = key.split("/", 1)
                stores[prefix][name] = z[key].copy()
    state.step = int(info["step"])
    state.optimizer = OptimizerConfig.model_validate(info["optimizer"])
    state.scheduler = LRSchedulerConfig.model_validate(info["scheduler"])
    state.rng.bit_generator.state = info["rng"]
    state.exp_avg, state.exp_avg_sq = stores["exp_avg"], stores["exp_avg_sq"]
    if stores["grad"]:
        state.grads = stores["grad"]


def _read_lora_config(path: Path) -> LoraConfig:
    meta_path = path / CHECKPOINT_META
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if isinstance(meta.get("lora"), dict):
            return LoraConfig.model_validate(meta["lora"])
    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise NotFoundError(f"no {ADAPTER_CONFIG} at {str(path)!r}", field="path")
    peft = json.loads(cfg_path.read_text())
    return LoraConfig(
        rank=int(peft.get("r", 8)),
        alpha=peft.get("lora_alpha"),
        dropout=float(peft.get("lora_dropout", 0.0)),
        target_modules=peft.get("target_modules"),
    )
