"""``TransformersBackend``: one HF causal LM, many LoRA adapters, rows of different adapters in one pass."""

from __future__ import annotations

import inspect
import itertools
import logging
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from twinkle.loss import check_finite_loss, nonfinite_gradient_error
from twinkle.model.base import Backend, BatchItem, SampleItem
from twinkle.types import (
    AdamParams,
    ForwardBackwardOutput,
    InvalidInputError,
    LimitExceededError,
    LoraConfig,
    LRSchedulerConfig,
    ModelInfo,
    NotFoundError,
    OptimizerConfig,
    SampleResponse,
    TensorData,
)

from . import _checkpoint, _decode, _lean
from ._adapter import AdapterState, resolve_targets
from ._lora import LoraPair, MultiLoraLinear, Routing, RoutingSlot, Segment
from ._pack import Layout, SharedLayout, pack, packing_is_exact, share_prefixes
from ._prepare import PreparedItem, prepare
from ._vision import VisionInputs, VisionSupport, is_vision_module, merger_unit

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _resolve_path(model_id: str) -> Path:
    try:
        from twinkle.model.hub import resolve_model
    except ImportError:
        pass
    else:
        return Path(resolve_model(model_id))
    p = Path(model_id).expanduser()
    if (p / "config.json").is_file():
        return p
    raise InvalidInputError(f"cannot resolve model {model_id!r} (no twinkle.model.hub, not a local HF directory)",
                            field="model_id")


def _load_model(auto: Any, path: str, dtype: torch.dtype, attn_implementation: str | None) -> Any:
    """Load with ``attn_implementation`` (default ``sdpa``); a model that does not support it (Gemma 2 refuses
    SDPA) falls back to what it supports (``eager``), with a log line saying so."""
    kw: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    try:
        return auto.from_pretrained(path, **kw)
    except ValueError as e:
        if not attn_implementation or "attention implementation" not in str(e).lower() \
                and "attn_implementation" not in str(e):
            raise
        log.warning("%s: attention %r is not supported (%s); using 'eager'", path, attn_implementation,
                    str(e).split(".")[0])
        kw["attn_implementation"] = "eager"
        return auto.from_pretrained(path, **kw)


_WEIGHTS_SERIAL = itertools.count(1)  # serials of adapters' weights changes (``_weights_key``)


class TransformersBackend(Backend):
    """HF transformers base model + a ``MultiLoraLinear`` on every linear layer (see ``_lora``)."""

    name = "transformers"
    # defaults for subclasses that build their model differently (megatron): no checkpointing, no autocast
    _ckpt_layers: list[nn.Module] | tuple[()] = ()
    _train_routing: tuple[Routing | None, Routing | None] = (None, None)
    autocast: torch.dtype | None = None
    _keep_kw = False
    _continuous: bool | None = None
    decode_kernels = False
    sample_dtype: torch.dtype | None = None  # subclasses that skip __init__ (megatron) sample in their own dtype
    _packed: bool | None = None
    _merged: _decode.Merged | None = None  # adapters' merged weights for sampling (float32, packed only)
    packing = False  # subclasses whose forward ignores position ids (megatron) keep the padded layout
    prefix_sharing = True  # with packing: datums of one adapter that start alike share their prefix's pass
    _pack_ok: bool | None = None
    _share_ok: bool | None = None

    def __init__(self, model_id: str, *, dtype: str = "float32", device: str | None = None, max_adapters: int = 64,
                 max_lora_rank: int = 256, attn_implementation: str | None = "sdpa",
                 gradient_checkpointing: bool = False, autocast: str | None = None,
                 decode_kernels: bool = True, packing: bool = True, sample_dtype: str | None = None) -> None:
        """``attn_implementation``: ``sdpa`` (default; a model that refuses it falls back to ``eager``), ``eager``,
        ``flash_attention_2``...; ``gradient_checkpointing``: recompute each decoder layer in the backward pass
        (less activation memory); ``autocast``: ``bfloat16``/``float16`` mixed precision for forward passes on
        CUDA (ignored elsewhere, so CPU float32 stays exact); ``decode_kernels``: on CPU, sample with the base
        weights laid out once for the GEMM that serves few rows best (a second copy of them) and, for float32,
        single-adapter passes with that adapter's merged weights (up to 2 more copies of the adapted layers;
        see ``_decode``); ``packing``:
        datums of one adapter share rows in training and forward passes (``_pack``: no padding waste, same
        logprobs and gradients), where the model proves exact on a probe; ``sample_dtype``: ``bfloat16`` runs the
        sampling passes of a float32 model with bfloat16 base weights (CPU: a bfloat16 copy of them for oneDNN,
        kept instead of the float32 one; CUDA: autocast), faster but no longer exact: sampled and prompt logprobs
        are those of that pass (``docs/scheduler.md``); training and forward passes stay float32."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

        if dtype not in _DTYPES:
            raise InvalidInputError(f"unknown dtype {dtype!r}; one of {sorted(_DTYPES)}", field="dtype")
        if sample_dtype not in (None, "float32", "bfloat16", "bf16"):
            raise InvalidInputError("sample_dtype is float32 (exact, the default) or bfloat16", field="sample_dtype")
        self.model_id = model_id
        self.path = _resolve_path(model_id)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _DTYPES[dtype]
        self.max_adapters = max_adapters
        self.max_lora_rank = max_lora_rank
        is_vl = getattr(AutoConfig.from_pretrained(str(self.path)), "vision_config", None) is not None
        auto = AutoModelForImageTextToText if is_vl else AutoModelForCausalLM
        self.model = _load_model(auto, str(self.path), self.dtype, attn_implementation).to(self.device)
        self.model.eval()
        self.model.requires_grad_(False)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self._ckpt_layers: list[nn.Module] = []
        self._train_routing: tuple[Routing | None, Routing | None] = (None, None)
        if self.gradient_checkpointing:
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self._ckpt_layers = [m for m in self.model.modules() if getattr(m, "gradient_checkpointing", False)]
        self.autocast: torch.dtype | None = None
        if autocast:
            if autocast not in ("bfloat16", "bf16", "float16", "fp16"):
                raise InvalidInputError("autocast is bfloat16 or float16", field="autocast")
            if self.device.type == "cuda":
                self.autocast = _DTYPES[autocast]
            else:
                log.info("autocast %s ignored on %s (float32 stays exact)", autocast, self.device.type)
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        cfg = self.model.config
        text_cfg = cfg.get_text_config()
        self.vocab_size = int(text_cfg.vocab_size)
        self.max_length = int(getattr(text_cfg, "max_position_embeddings", 2048) or 2048)
        self._vision: VisionSupport | None = VisionSupport(self.path, self.model, cfg) if is_vl else None
        self._vrouting = RoutingSlot()  # vision-tower LoRA routing, in patch units
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._keep_kw = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._routing = RoutingSlot()
        self._layers: dict[str, MultiLoraLinear] = {}
        self._wrap_linears()
        self._adapters: dict[str, AdapterState] = {}
        self._eos = self._eos_ids()
        self._continuous: bool | None = None
        self.decode_kernels = bool(decode_kernels)
        # bfloat16 sampling passes of a float32 model (None: the model's own dtype, exact)
        self.sample_dtype = (
            torch.bfloat16 if sample_dtype in ("bfloat16", "bf16") and self.dtype == torch.float32 else None)
        self._packed: bool | None = None
        self._merged: _decode.Merged | None = None
        self._lean: _lean.LeanDecoder | None | Literal[False] = False  # False: not probed yet (``_lean_decoder``)
        self.packing = bool(packing)
        self._pack_ok = None
        self._share_ok = None

    # -- setup -----------------------------------------------------------------------------------------------
    def _wrap_linears(self) -> None:
        out_emb = self.model.get_output_embeddings()
        self._unembed: str | None = None
        targets = [(n, m) for n, m in self.model.named_modules() if isinstance(m, nn.Linear)]
        for name, mod in targets:
            parent_name, _, attr = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            if self._vision is not None and is_vision_module(name):
                wrapped = MultiLoraLinear(mod, self._vrouting, unit=merger_unit(name, self._vision.info.merge_size))
            else:
                wrapped = MultiLoraLinear(mod, self._routing)
            setattr(parent, attr, wrapped)
            self._layers[name] = wrapped
            if mod is out_emb:
                self._unembed = name

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        gc = getattr(self.model, "generation_config", None)
        for src in (getattr(gc, "eos_token_id", None), getattr(self.model.config.get_text_config(), "eos_token_id", None),
                    self._tokenizer.eos_token_id):
            for x in src if isinstance(src, (list, tuple)) else [src]:
                if isinstance(x, int) and x not in ids:
                    ids.append(x)
        return ids

    # -- model -----------------------------------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        cfg = self.model.config
        arch = (getattr(cfg, "architectures", None) or [cfg.model_type])[0]
        n = sum(p.numel() for n_, p in self.model.named_parameters() if ".adapters." not in n_)
        return ModelInfo(model_name=self.model_id, backend=self.name, arch=arch, vocab_size=self.vocab_size,
                         max_length=self.max_length, tokenizer_id=str(self.path), eos_token_ids=self._eos,
                         num_parameters=n, vision=self._vision.info if self._vision is not None else None)

    def tokenizer(self) -> Any:
        return self._tokenizer

    # -- adapters --------------------------------------------------------------------------------------------
    def _get(self, adapter: str) -> AdapterState:
        st = self._adapters.get(adapter)
        if st is None:
            raise NotFoundError(f"unknown adapter {adapter!r}", field="adapter")
        return st

    def _check_new(self, adapter: str, config: LoraConfig, modules: list[str] | None = None) -> list[str]:
        if not isinstance(adapter, str) or not adapter:
            raise InvalidInputError("adapter name must be a non-empty string", field="adapter")
        if adapter in self._adapters:
            raise InvalidInputError(f"adapter {adapter!r} already exists", field="adapter")
        if len(self._adapters) >= self.max_adapters:
            raise LimitExceededError(f"at most {self.max_adapters} adapters per model", field="adapter")
        if config.rank > self.max_lora_rank:
            raise LimitExceededError(f"rank {config.rank} is above the limit {self.max_lora_rank}", field="lora.rank")
        if modules is not None:
            missing = [m for m in modules if m not in self._layers]
            if missing:
                raise InvalidInputError(f"checkpoint targets modules absent from the model: {missing[:3]}",
                                        field="path")
            return modules
        chosen = resolve_targets(config, list(self._layers), self._unembed)
        if config.target_modules in (None, "all-linear") and not config.train_vision:
            chosen = [m for m in chosen if not is_vision_module(m)] or chosen
        return chosen

    def add_adapter(self, adapter: str, config: LoraConfig, *, _modules: list[str] | None = None) -> None:
        if not isinstance(config, LoraConfig):
            raise InvalidInputError("config must be a LoraConfig", field="lora")
        modules = self._check_new(adapter, config, _modules)
        gen = torch.Generator(device="cpu").manual_seed(int(config.seed or 0))
        pairs: dict[str, LoraPair] = {}
        for m in modules:
            base = self._layers[m].base
            pairs[m] = LoraPair(base.in_features, base.out_features, config.rank, config.lora_alpha, config.dropout,
                                dtype=torch.float32, device=self.device, generator=gen)
        for m, pair in pairs.items():
            self._layers[m].adapters[adapter] = pair
        st = AdapterState(adapter, config, modules, pairs)
        st.make_optimizer()
        self._adapters[adapter] = st
        self._weights_epochs()[adapter] = next(_WEIGHTS_SERIAL)

    def remove_adapter(self, adapter: str) -> None:
        st = self._get(adapter)
        for m in st.modules:
            del self._layers[m].adapters[adapter]
        del self._adapters[adapter]
        self._weights_changed(adapter)

    def _weights_changed(self, adapter: str) -> None:
        """``adapter``'s weights changed or went: its merged sampling weights are stale (see ``_decode.Merged``),
        and so is any sampling cache made with them (``_weights_key``)."""
        self._weights_epochs()[adapter] = next(_WEIGHTS_SERIAL)
        if self._merged is not None:
            self._merged.drop(adapter)

    def _weights_key(self, adapter: str | None) -> Any:
        """A key that changes whenever ``adapter``'s weights do: the serial of its last change through this
        backend (add, ``optim_step``, ``load``, removal) and its parameters' version counters (any in-place
        change); the base model's never changes. The continuous sampler keys reused prompt caches on it."""
        if adapter is None:
            return 0
        st = self._adapters.get(adapter)
        epoch = self._weights_epochs().get(adapter)
        return (epoch, None if st is None else sum(p._version for p in st.parameters()))

    def _weights_epochs(self) -> dict[str, int]:
        """adapter -> serial of its last weights change (made on first use: subclasses need not call __init__)."""
        epochs: dict[str, int] | None = self.__dict__.get("_wepochs")
        if epochs is None:
            epochs = self.__dict__["_wepochs"] = {}
        return epochs

    def list_adapters(self) -> list[str]:
        return list(self._adapters)

    def adapter_config(self, adapter: str) -> LoraConfig:
        return self._get(adapter).config

    def set_optimizer(self, adapter: str, config: OptimizerConfig) -> None:
        st = self._get(adapter)
        old = st.opt_config
        st.opt_config = config
        if st.optimizer is None or old.name != config.name:
            st.make_optimizer()

    def set_lr_scheduler(self, adapter: str, config: LRSchedulerConfig) -> None:
        self._get(adapter).scheduler = config

    def step_count(self, adapter: str) -> int:
        return self._get(adapter).step

    # -- compute ---------------------------------------------------------------------------------------------
    def _forward_logits(self, ids: torch.Tensor, segments: list[Segment], *, train: bool, mask: torch.Tensor | None = None,
                        pos: torch.Tensor | None = None, cache: Any = None, use_cache: bool = False,
                        vision: VisionInputs | None = None, last_only: bool = False,
                        infer: bool = False, lean: bool = True) -> tuple[torch.Tensor, Any]:
        """``infer``: a no-grad sampling pass (base layers may use their packed inference weights, a single
        adapter its merged ones, and the model the lean forward of ``_lean`` unless ``lean`` is False)."""
        infer = infer and not train
        fast = self._lean_decoder() if infer and lean and vision is None and use_cache else None
        merged = None
        if infer and self._merged is not None and len(segments) == 1:
            name = segments[0][2]
            st = self._adapters.get(name) if name is not None else None
            if name is not None and st is not None and self._merged.use(name, st, self._layers, ids.numel()):
                merged = name
        self._routing[0] = Routing(segments, dropout=train, infer=infer, merged=merged)
        if vision is not None:
            self._vrouting[0] = Routing(vision.patch_segments, dropout=train)
            pos = vision.position_ids
        try:
            if fast is not None:
                with self._compute_context(train, infer):
                    return fast.forward(ids, mask, pos, cache, last_only=last_only)
            kw: dict[str, Any] = {"input_ids": ids, "use_cache": use_cache}
            if vision is not None:
                kw["pixel_values"] = vision.pixel_values
                kw["image_grid_thw"] = vision.image_grid_thw
            if mask is not None:
                kw["attention_mask"] = mask
            if pos is not None:
                kw["position_ids"] = pos
            if cache is not None:
                kw[self._cache_kw] = cache
            if last_only and self._keep_kw:
                kw["logits_to_keep"] = 1
            with self._compute_context(train, infer):
                out = self.model(**kw)
        finally:
            if train and self._ckpt_layers:  # checkpointed layers re-run in backward with this routing
                self._train_routing = (self._routing[0], self._vrouting[0])
            self._routing[0] = None
            self._vrouting[0] = None
        new_cache = (out.get("cache") or out.get("past_key_values")) if use_cache else None
        return out.logits, new_cache

    def _compute_context(self, train: bool, infer: bool = False) -> Any:
        """Autocast (when configured; for sampling passes on CUDA also by ``sample_dtype``) and, in training
        passes, the checkpointed layers switched on."""
        import contextlib

        stack = contextlib.ExitStack()
        cast = self.autocast
        if cast is None and infer and self.sample_dtype is not None and self.device.type == "cuda":
            cast = self.sample_dtype
        if cast is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=cast))
        if train and self._ckpt_layers:
            for m in self._ckpt_layers:  # HF checkpoints a layer only when it is "training"; dropout stays off
                m.training = True
            def _off() -> None:
                for m in self._ckpt_layers:
                    m.training = False

            stack.callback(_off)
        return stack

    def _row_logprobs(self, tokens: list[np.ndarray], targets: list[np.ndarray], segments: list[Segment],
                      train: bool, images: list[list[Any]] | None = None) -> list[torch.Tensor]:
        """Per-row logprobs of the target tokens (shape of each target array) in one forward pass."""
        if images is None and len(tokens) > 1 and self._can_pack():
            return self._packed_logprobs(tokens, targets, segments, train)
        return self._padded_logprobs(tokens, targets, segments, train, images)

    def _padded_logprobs(self, tokens: list[np.ndarray], targets: list[np.ndarray], segments: list[Segment],
                         train: bool, images: list[list[Any]] | None = None) -> list[torch.Tensor]:
        """One datum per row, right-padded to the longest."""
        b, width = len(tokens), max(t.size for t in tokens)
        ids = np.zeros((b, width), dtype=np.int64)
        flat = all(t.ndim == 1 for t in targets)
        tg = np.zeros((b, width), dtype=np.int64) if flat else None
        for r, (t, y) in enumerate(zip(tokens, targets, strict=True)):
            ids[r, : t.size] = t
            if tg is not None:
                tg[r, : t.size] = y
        ids_t = torch.from_numpy(ids).to(self.device)
        vis = None
        if images is not None and self._vision is not None:
            vis = self._vision.inputs(ids_t, images, segments)
        logits, _ = self._forward_logits(ids_t, segments, train=train, vision=vis)
        logits = logits.float()
        if tg is not None:
            y = torch.from_numpy(tg).to(self.device)
            lp = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view(b, width)
            return [lp[r, : t.size] for r, t in enumerate(tokens)]
        out = []
        for r, (t, y) in enumerate(zip(tokens, targets, strict=True)):
            lg = torch.log_softmax(logits[r, : t.size], dim=-1)
            yt = torch.from_numpy(y).to(self.device)
            out.append(lg.gather(-1, yt if yt.ndim == 2 else yt[:, None]).reshape(yt.shape))
        return out

    def _can_pack(self) -> bool:
        """Packing is on and this model's attention keeps packed datums apart (probed once, base model)."""
        if not self.packing or self._vision is not None:
            return False
        if self._pack_ok is None:
            def fwd(ids: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
                return self._forward_logits(ids, [(0, 1, None)], train=False, pos=pos)[0]

            tol = 1e-4 if self.dtype == torch.float32 and self.autocast is None else 3e-2
            self._pack_ok = packing_is_exact(fwd, self.device, tol)
            if not self._pack_ok:
                log.warning("%s: packed rows do not match separate rows (the attention ignores position ids); "
                            "training batches stay padded", self.model_id)
        return self._pack_ok

    def _attention_mask(self, allow: np.ndarray) -> torch.Tensor | None:
        """A 4-D mask from ``allow`` (rows, q, k) the model's attention takes as it is: boolean for SDPA,
        additive for eager; ``None`` for kernels that take no such mask (flash attention) or sliding windows."""
        impl = getattr(self.model.config, "_attn_implementation", None)
        if impl not in ("sdpa", "eager") or any(
                getattr(m, "sliding_window", None) for m in self.model.modules() if type(m).__name__.endswith("Attention")):
            return None
        a = torch.from_numpy(allow).to(self.device)[:, None]
        if impl == "sdpa":
            return a
        dtype = self.dtype
        return torch.zeros(a.shape, dtype=dtype, device=self.device).masked_fill_(~a, torch.finfo(dtype).min)

    def _can_share(self) -> bool:
        """Shared-prefix rows are exact for this model (probed once: a trunk and two branches in one row
        against each sequence alone)."""
        if self._share_ok is None:
            toks = [np.array([3, 7, 11, 5, 9, 4, 8, 2, 6]), np.array([3, 7, 11, 5, 9, 4, 8, 2, 1, 12])]
            lay = share_prefixes(toks, [(0, 2, None)], min_shared=4)
            mask = self._attention_mask(lay.allow) if lay is not None else None
            ok = False
            if lay is not None and mask is not None:
                with torch.no_grad():
                    got = self._forward_logits(torch.from_numpy(lay.ids).to(self.device), [(0, lay.rows, None)],
                                               train=False, mask=mask,
                                               pos=torch.from_numpy(lay.pos).to(self.device))[0].float()
                    flat = got.reshape(-1, got.shape[-1])
                    ok = True
                    for t, idx in zip(toks, lay.index, strict=True):
                        alone = self._forward_logits(torch.from_numpy(t[None]).to(self.device), [(0, 1, None)],
                                                     train=False)[0].float()[0]
                        tol = 1e-4 if self.dtype == torch.float32 and self.autocast is None else 3e-2
                        scale = float(alone.abs().max()) or 1.0
                        ok = ok and bool((flat[torch.from_numpy(idx)] - alone).abs().max() <= tol * scale)
            self._share_ok = ok
            if not ok:
                log.info("%s: shared-prefix rows are off (attention %s)", self.model_id,
                         getattr(self.model.config, "_attn_implementation", None))
        return self._share_ok

    def _shared_logprobs(self, lay: SharedLayout, targets: list[np.ndarray], train: bool) -> list[torch.Tensor]:
        """``_row_logprobs`` over the shared-prefix layout (``_pack.share_prefixes``)."""
        mask = self._attention_mask(lay.allow)
        ids_t = torch.from_numpy(lay.ids).to(self.device)
        pos_t = torch.from_numpy(lay.pos).to(self.device)
        logits, _ = self._forward_logits(ids_t, lay.segments, train=train, mask=mask, pos=pos_t)
        flat = logits.float().reshape(-1, logits.shape[-1])
        if all(t.ndim == 1 for t in targets):
            idx = torch.from_numpy(np.concatenate(lay.index)).to(self.device)
            y = torch.from_numpy(np.concatenate(targets).astype(np.int64)).to(self.device)
            lp = -F.cross_entropy(flat[idx], y, reduction="none")
            return list(lp.split([int(t.shape[0]) for t in targets]))
        out = []
        for ix, y in zip(lay.index, targets, strict=True):
            lg = torch.log_softmax(flat[torch.from_numpy(ix).to(self.device)], dim=-1)
            yt = torch.from_numpy(y).to(self.device)
            out.append(lg.gather(-1, yt if yt.ndim == 2 else yt[:, None]).reshape(yt.shape))
        return out

    def _packed_logprobs(self, tokens: list[np.ndarray], targets: list[np.ndarray], segments: list[Segment],
                         train: bool) -> list[torch.Tensor]:
        """``_row_logprobs`` over the packed layout (``_pack``): one row holds several datums of one adapter;
        datums of one adapter that start alike (a GRPO group's prompt) share their prefix where that is exact."""
        if self.prefix_sharing:
            shared = share_prefixes(tokens, segments)
            if shared is not None and self._can_share():
                return self._shared_logprobs(shared, targets, train)
        lay: Layout = pack(tokens, segments)
        if lay.rows == len(tokens):  # nothing shares a row: the padded layout is the same pass
            return self._padded_logprobs(tokens, targets, segments, train)
        ids_t = torch.from_numpy(lay.ids).to(self.device)
        pos_t = torch.from_numpy(lay.pos).to(self.device)
        logits, _ = self._forward_logits(ids_t, lay.segments, train=train, pos=pos_t)
        logits = logits.float()
        if all(t.ndim == 1 for t in targets):
            tg = np.zeros_like(lay.ids)
            for (r, off), t in zip(lay.place, targets, strict=True):
                tg[r, off:off + t.size] = t
            y = torch.from_numpy(tg).to(self.device)
            lp = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
            lp = lp.view(lay.ids.shape)
            return [lp[r, off:off + t.size] for (r, off), t in zip(lay.place, tokens, strict=True)]
        out = []
        for (r, off), t, y in zip(lay.place, tokens, targets, strict=True):
            lg = torch.log_softmax(logits[r, off:off + t.size], dim=-1)
            yt = torch.from_numpy(y).to(self.device)
            out.append(lg.gather(-1, yt if yt.ndim == 2 else yt[:, None]).reshape(yt.shape))
        return out

    def run_batch(self, items: list[BatchItem]) -> list[ForwardBackwardOutput]:
        prepared = prepare(items, set(self._adapters), self.vocab_size, self.max_length, expand=self._expand)
        order = sorted(range(len(prepared)), key=lambda i: (items[i].adapter is not None, items[i].adapter or ""))
        tokens: list[np.ndarray] = []
        targets: list[np.ndarray] = []
        images: list[list[Any]] = []
        segments: list[Segment] = []
        spans: dict[int, tuple[int, int]] = {}
        for i in order:
            p = prepared[i]
            start = len(tokens)
            tokens.extend(p.tokens)
            images.extend(p.images or [[] for _ in p.tokens])
            targets.extend(inp["target_tokens"] for inp in p.inputs)
            spans[i] = (start, len(tokens))
            a = p.item.adapter
            if segments and segments[-1][2] == a:
                segments[-1] = (segments[-1][0], len(tokens), a)
            else:
                segments.append((start, len(tokens), a))
        train = any(not p.item.forward_only for p in prepared)
        with torch.set_grad_enabled(train):
            lps = self._row_logprobs(tokens, targets, segments, train, images if any(images) else None)
            refs = self._reference_logprobs(prepared)
            total: torch.Tensor | None = None
            results: list[ForwardBackwardOutput] = []
            for i, p in enumerate(prepared):
                s, e = spans[i]
                inputs = [self._to_torch(inp) for inp in p.inputs]
                for j, r in refs.get(i, {}).items():
                    inputs[j]["ref_logprobs"] = r
                lo = p.spec.fn(lps[s:e], inputs, p.config)
                # A NaN/inf loss is refused before any gradient is kept (a forward too: its metric would be NaN).
                check_finite_loss(p.spec.name, float(lo.loss.detach()))
                if not p.item.forward_only:
                    total = lo.loss if total is None else total + lo.loss
                results.append(self._output(lo))
            try:
                if total is not None and total.requires_grad:
                    if self._ckpt_layers:
                        self._routing[0], self._vrouting[0] = self._train_routing
                    total.backward()
            finally:
                self._routing[0] = None
                if hasattr(self, "_vrouting"):
                    self._vrouting[0] = None
        return results

    def grad_snapshot(self, adapter: str) -> list[torch.Tensor | None] | None:
        """A copy of ``adapter``'s accumulated gradients (the scheduler restores it if a micro-batch fails)."""
        return [None if p.grad is None else p.grad.detach().clone() for p in self._get(adapter).parameters()]

    def grad_restore(self, adapter: str, saved: list[torch.Tensor | None]) -> None:
        for p, g in zip(self._get(adapter).parameters(), saved, strict=True):
            p.grad = g

    def _reference_logprobs(self, prepared: list[PreparedItem]) -> dict[int, dict[int, torch.Tensor]]:
        need = [(i, j) for i, p in enumerate(prepared) if p.spec.needs_reference
                for j, inp in enumerate(p.inputs) if "ref_logprobs" not in inp]
        if not need:
            return {}
        toks = [prepared[i].tokens[j] for i, j in need]
        imgs = [prepared[i].images[j] if prepared[i].images else [] for i, j in need]
        tgts = [prepared[i].inputs[j]["target_tokens"] for i, j in need]
        with torch.no_grad():
            lps = self._row_logprobs(toks, tgts, [(0, len(toks), None)], train=False,
                                     images=imgs if any(imgs) else None)
        out: dict[int, dict[int, torch.Tensor]] = {}
        for (i, j), lp in zip(need, lps, strict=True):
            out.setdefault(i, {})[j] = lp.detach()
        return out

    def _to_torch(self, inp: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in inp.items()}

    @staticmethod
    def _output(lo: Any) -> ForwardBackwardOutput:
        outs = []
        for o in lo.outputs:
            outs.append({k: TensorData.from_numpy(v.detach().float().cpu().numpy(), "float32") for k, v in o.items()})
        return ForwardBackwardOutput(loss_fn_outputs=outs, metrics=dict(lo.metrics))

    def _reduce_grads(self, params: list[Any]) -> None:
        """Hook: combine gradients computed elsewhere (data-parallel ranks) before the step. Single process: none."""

    def _grad_norm(self, with_grad: list[Any]) -> float:
        """The global L2 norm of the gradients of ``with_grad`` (for the clip and the reported ``grad_norm``)."""
        if not with_grad:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in with_grad])))

    def optim_step(self, adapter: str, params: AdamParams | None = None) -> dict[str, float]:
        st = self._get(adapter)
        if params is None:
            factor = st.scheduler.factor(st.step) if st.scheduler is not None else 1.0
            params = st.opt_config.adam_params(lr=st.opt_config.lr * factor)
        elif not isinstance(params, AdamParams):
            raise InvalidInputError("params must be AdamParams", field="adam_params")
        plist = st.parameters()
        self._reduce_grads(plist)
        with_grad = [p for p in plist if p.grad is not None]
        grads = [p.grad for p in with_grad]
        norm = self._grad_norm(with_grad)
        if not math.isfinite(norm):  # not applied: weights and optimizer state stay bit-identical
            for p in plist:
                p.grad = None
            raise nonfinite_gradient_error(norm)
        if params.grad_clip_norm > 0 and grads and norm > params.grad_clip_norm:
            coef = params.grad_clip_norm / (norm + 1e-6)
            torch._foreach_mul_(grads, coef)
        assert st.optimizer is not None
        for g in st.optimizer.param_groups:
            g["lr"] = params.learning_rate
            g["weight_decay"] = params.weight_decay
            if "betas" in g:
                g["betas"] = (params.beta1, params.beta2)
                g["eps"] = params.eps
        st.optimizer.step()
        self._weights_changed(adapter)
        st.optimizer.zero_grad(set_to_none=True)
        st.step += 1
        return {"grad_norm:mean": norm, "lr:mean": float(params.learning_rate), "step:max": float(st.step)}

    def _expand(self, model_input: Any, field: str) -> tuple[list[int], list[Any]]:
        """Token ids of a model input with its images expanded (text-only models: ``to_ints``)."""
        from twinkle.model.images import has_images, resolve_model_input

        if not has_images(model_input):
            return model_input.to_ints(), []
        return resolve_model_input(model_input, self.model_info(), field)

    def _sample_images(self, item: SampleItem) -> SampleResponse:
        """One request whose prompt holds images: prefill with the pixels and explicit 3-D rope positions,
        decode with the row's rope delta added to the text position (what HF ``generate`` does)."""
        from twinkle.model.images import resolve_model_input
        from twinkle.sampler.engine import generate
        from twinkle.types import ModelInput

        assert self._vision is not None
        img_id = self._vision.info.image_token_id
        prompt = ModelInput(chunks=list(item.images or []))  # images only: the pixels, in order
        _, resolved = resolve_model_input(prompt, self.model_info(), "prompt")
        runs = sum(1 for j, t in enumerate(item.prompt) if t == img_id and (j == 0 or item.prompt[j - 1] != img_id))
        if runs != len(resolved) or item.prompt.count(img_id) != sum(r.tokens for r in resolved):
            raise InvalidInputError("the prompt's image placeholders do not match its images", field="prompt")
        state: dict[str, torch.Tensor] = {}

        def forward(ids: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor, cache: Any,
                    segments: list[Segment]) -> tuple[torch.Tensor, Any]:
            if cache is None:
                assert self._vision is not None
                vis = self._vision.inputs(ids, [resolved] * ids.shape[0], segments, mask)
                assert vis is not None
                state["delta"] = vis.rope_deltas
                return self._forward_logits(ids, segments, train=False, mask=mask, cache=None, use_cache=True,
                                            vision=vis)
            pos3 = (pos + state["delta"])[None].expand(3, -1, -1)
            return self._forward_logits(ids, segments, train=False, mask=mask, pos=pos3, cache=cache, use_cache=True)

        out = generate(forward, [item], eos_ids=self._eos, vocab_size=self.vocab_size, max_length=self.max_length,
                       device=self.device, decode=self._decode_text)[0]
        for field_name in ("prompt_logprobs", "topk_prompt_logprobs"):
            vals = getattr(out, field_name)
            if vals is not None:
                setattr(out, field_name, [None if t == img_id else v for t, v in zip(item.prompt, vals, strict=True)])
        return out

    def _sample_forward(self, ids: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor, cache: Any,
                        segments: list[Segment], last_only: bool = False) -> tuple[torch.Tensor, Any]:
        """``last_only``: logits of the last position only (a prefill without prompt logprobs: the unembedding
        of every prompt position is skipped, a large saving for big vocabularies)."""
        if not self._decode_kernels():  # (subclasses with their own _forward_logits never pack)
            return self._forward_logits(ids, segments, train=False, mask=mask, pos=pos, cache=cache,
                                        use_cache=True, last_only=last_only)
        return self._forward_logits(ids, segments, train=False, mask=mask, pos=pos, cache=cache, use_cache=True,
                                    last_only=last_only, infer=True)

    def _decode_kernels(self) -> bool:
        """Pack the base linear weights for inference on first use (see ``_decode``; in ``sample_dtype`` when
        set); whether they are. A float32 model sampling in float32 also merges a single sampling adapter into
        them (``_decode.Merged``; a bfloat16 copy would round the adapter's update away, so its LoRA products
        stay separate, in float32)."""
        if self._packed is None:
            weights = self.sample_dtype if self.device.type == "cpu" else None
            self._packed = self.decode_kernels and _decode.pack_all(
                self._layers.values(), device=self.device, dtype=self.dtype, weights=weights)
            if weights is not None and not self._packed:
                log.warning("sample_dtype %s: no bfloat16 kernels here (decode_kernels off, or torch without "
                            "oneDNN); sampling stays %s", weights, self.dtype)
            if self._packed and self.dtype == torch.float32 and weights is None:
                self._merged = _decode.Merged()
        return self._packed

    def _lean_decoder(self) -> _lean.LeanDecoder | None:
        """The lean sampling forward (``_lean``) once it proved equal to the HF forward on a probe, else None."""
        if self._lean is False:
            self._lean = None
            lean = _lean.build(self.model) if self._vision is None else None
            if lean is not None:
                def mine(ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
                    self._routing[0] = Routing([(0, ids.shape[0], None)], infer=True)
                    try:
                        return lean.forward(ids, mask, pos, cache)
                    finally:
                        self._routing[0] = None

                def ref(ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
                    return self._forward_logits(ids, [(0, ids.shape[0], None)], train=False, mask=mask, pos=pos,
                                                cache=cache, use_cache=True, infer=True, lean=False)

                try:
                    ok = _lean.agrees(mine, ref, self.vocab_size, self.device, self.dtype)
                except Exception as e:  # noqa: BLE001 - a layout the lean forward misreads: keep the HF forward
                    log.warning("lean decode forward failed its probe (%s: %s): not used", type(e).__name__, e)
                    ok = False
                if ok:
                    self._lean = lean
        return self._lean if self._lean is not False else None

    def _decode_text(self, toks: list[int]) -> str:
        return self._tokenizer.decode(toks, skip_special_tokens=False)

    def continuous_ok(self) -> bool:
        """Whether this model's KV cache supports continuous batching (probed once with a 1-token forward)."""
        if getattr(self, "_continuous", None) is None:
            from twinkle.sampler.engine import kv_cache_supports_continuous

            with torch.no_grad():
                ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
                _, cache = self._sample_forward(ids, None, ids, None, [(0, 1, None)])
            self._continuous = kv_cache_supports_continuous(cache)
        return bool(self._continuous)

    def concurrent_sampling(self) -> bool:
        """Switch LoRA routing to per-thread slots so the scheduler may run sampling passes on their own thread
        while training runs on another (base weights are read-only; the scheduler never samples an adapter
        while its own weights change). False (and nothing changes) with gradient checkpointing, whose
        recomputation in backward may run on autograd's own threads and must see the training routing."""
        if self._ckpt_layers:
            return False
        self._routing.per_thread = True
        self._vrouting.per_thread = True
        return True

    def sampler_engine(self, *, kv_budget: int | None = None, prefill_chunk: int = 512,
                       prefix_tokens: int = 0) -> Any:
        """A ``ContinuousSampler`` over this model (``None`` when its cache kind does not support it);
        ``prefix_tokens``: cached positions of finished sequences kept for prompts that start with them."""
        from twinkle.sampler.engine import ContinuousSampler

        if not self.continuous_ok():
            return None
        return ContinuousSampler(self._sample_forward, eos_ids=self._eos, vocab_size=self.vocab_size,
                                 max_length=self.max_length, device=self.device, decode=self._decode_text,
                                 prefill_chunk=prefill_chunk, kv_budget=kv_budget, prefix_tokens=prefix_tokens,
                                 weights_key=self._weights_key)

    def validate_sample(self, items: list[SampleItem]) -> None:
        from twinkle.sampler.engine import validate_sample_items

        validate_sample_items(items, set(self._adapters), self.vocab_size, self.max_length)

    def sample(self, items: list[SampleItem]) -> list[SampleResponse]:
        from twinkle.sampler.engine import generate

        self.validate_sample(items)
        if any(it.images for it in items):
            if self._vision is None:
                raise InvalidInputError(f"model {self.model_id!r} is text-only; it does not accept images",
                                        field="prompt")
            text = [i for i, it in enumerate(items) if not it.images]
            res: dict[int, SampleResponse] = dict(zip(text, self.sample([items[i] for i in text]), strict=True)) \
                if text else {}
            for i, it in enumerate(items):
                if it.images:
                    res[i] = self._sample_images(it)
            return [res[i] for i in range(len(items))]
        engine = self.sampler_engine(prefill_chunk=1 << 30)
        if engine is not None:
            for i, it in enumerate(items):
                engine.admit(i, it)
            done = engine.run_all()  # nothing aborts these: every response is there
            return [r for r in (done[i] for i in range(len(items))) if r is not None]
        return generate(self._sample_forward, items, eos_ids=self._eos, vocab_size=self.vocab_size,
                        max_length=self.max_length, device=self.device, decode=self._decode_text)

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save(self, adapter: str, path: Path, *, optimizer: bool = True) -> None:
        _checkpoint.save(self, self._get(adapter), Path(path), optimizer=optimizer)

    def load(self, adapter: str, path: Path, *, optimizer: bool = True) -> LoraConfig:
        try:
            return _checkpoint.load(self, adapter, Path(path), optimizer=optimizer)
        finally:
            self._weights_changed(adapter)

    def close(self) -> None:
        self._adapters.clear()
        for layer in self._layers.values():
            layer.adapters.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
