"""``MegatronBackend``: the transformers backend's contract on a megatron-core GPTModel.

Everything that does not depend on the network itself (adapter bookkeeping, losses, optimizer steps, the
sampling loop, peft-format checkpoints) is inherited from ``TransformersBackend``. What differs:

* the model is a megatron-core ``GPTModel`` built from the HF checkpoint's config, weights converted on load
  (``convert.py``);
* LoRA lives on megatron's fused linear layers, one ``LoraPair`` per HF projection (``_lora.py``), so adapters
  are addressed by their HF module names (``model.layers.0.self_attn.q_proj``…). Checkpoints are therefore
  written in the peft format for the HF architecture, and load into the transformers backend, peft or vLLM;
* sampling keeps a KV cache in megatron-core's own ``StaticInferenceContext`` (``_kv_cache``): the prompt is
  prefilled once, then each step feeds one token per row; left padding is masked per row, LoRA rows are routed
  as in training, and each TP rank caches its own heads. Anything the cache cannot serve (``kv_cache=False``,
  a model without RoPE or with flash-decode / sequence parallelism, or a failing prefill) falls back to
  recomputing the whole sequence at each step;
* with ``tensor_parallel_size`` × ``data_parallel_size`` > 1 the replica spans several ranks (``_ranks``): this
  object is rank 0 and mirrors every decorated (``@collective``) call to the others; TP slices live in
  ``_lora``/``convert``, DP rows and gradients in ``_parallel``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twinkle.model.base import BatchItem, SampleItem
from twinkle.model.transformers import _checkpoint
from twinkle.model.transformers._lora import LoraPair, Routing, RoutingSlot, Segment
from twinkle.model.transformers.backend import _DTYPES, TransformersBackend, _resolve_path
from twinkle.types import (
    AdamParams,
    ForwardBackwardOutput,
    InvalidInputError,
    LoraConfig,
    LRSchedulerConfig,
    ModelInfo,
    OptimizerConfig,
    SampleResponse,
)

from . import _kv_cache, _parallel, _ranks
from ._lora import FUSED, HF_PARENT, MegatronMultiLora, part_shards
from ._model import causal_forward, init_parallel, load_megatron_model
from ._ranks import collective
from .convert import Geometry, geometry, padded_vocab


class _Features:
    def __init__(self, in_features: int, out_features: int) -> None:
        self.in_features = in_features
        self.out_features = out_features


class _PartAdapters(MutableMapping):
    """``adapters`` of one HF projection, stored inside the fused megatron layer that carries it."""

    def __init__(self, layer: MegatronMultiLora, part: str) -> None:
        self._layer, self._part = layer, part

    def __getitem__(self, adapter: str) -> LoraPair:
        if adapter in self._layer.adapters and self._part in self._layer.adapters[adapter]:
            return self._layer.adapters[adapter][self._part]
        raise KeyError(adapter)

    def __setitem__(self, adapter: str, pair: LoraPair) -> None:
        if adapter not in self._layer.adapters:
            self._layer.add(adapter, {})
        self._layer.adapters[adapter][self._part] = pair

    def __delitem__(self, adapter: str) -> None:
        parts = self._layer.adapters[adapter]
        del parts[self._part]
        if len(parts) == 0:
            del self._layer.adapters[adapter]

    def __iter__(self) -> Iterator[str]:
        return (a for a in list(self._layer.adapters) if self._part in self._layer.adapters[a])

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _PartView:
    """What the inherited adapter code expects of ``_layers[name]``: ``.base`` sizes and ``.adapters``."""

    def __init__(self, layer: MegatronMultiLora, part: str) -> None:
        self.layer = layer
        self.base = _Features(layer.in_features, layer.part_out_features(part))
        self.adapters = _PartAdapters(layer, part)


class MegatronBackend(TransformersBackend):
    name = "megatron"

    def __init__(self, model_id: str, *, dtype: str = "float32", device: str | None = None, max_adapters: int = 64,
                 max_lora_rank: int = 256, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 data_parallel_size: int = 1, launcher: str = "auto", rank_num_cpus: float = 1.0, kv_cache: bool = True,
                 _ranks: _ranks.Ranks | None = None, **_ignored: Any) -> None:
        from transformers import AutoConfig

        if dtype not in _DTYPES:
            raise InvalidInputError(f"unknown dtype {dtype!r}; one of {sorted(_DTYPES)}", field="dtype")
        tp, dp = _size(tensor_parallel_size, "tensor"), _size(data_parallel_size, "data")
        if _size(pipeline_parallel_size, "pipeline") != 1:
            raise InvalidInputError("pipeline parallelism is not supported by the megatron backend yet; set "
                                    "megatron.pipeline_parallel_size to 1 (use tensor/data parallel sizes)",
                                    field="megatron.pipeline_parallel_size")
        if launcher not in ("auto", "ray", "process"):
            raise InvalidInputError("megatron.launcher is one of auto, ray, process", field="megatron.launcher")
        self.model_id = model_id
        self.path = _resolve_path(model_id)
        g = geometry(AutoConfig.from_pretrained(str(self.path)))
        _check_tp(g, tp)
        world = tp * dp
        if _ranks is None and world > 1:
            slots, what = _ranks_mod.available_slots(float(rank_num_cpus))
            if world > slots:
                raise InvalidInputError(
                    f"tensor_parallel_size × data_parallel_size = {world} ranks, but this node has {slots} {what}",
                    field="megatron.tensor_parallel_size" if tp > 1 else "megatron.data_parallel_size")
            # followers pick their own GPU (Ray: the one it lent them, as device 0; processes: cuda:<rank>)
            follower_device = "cpu" if device is not None and str(device).startswith("cpu") else None
            kwargs = dict(model_id=model_id, dtype=dtype, device=follower_device, max_adapters=max_adapters,
                          max_lora_rank=max_lora_rank, tensor_parallel_size=tp, data_parallel_size=dp,
                          kv_cache=bool(kv_cache))
            _ranks = _ranks_mod.start(world, type(self), kwargs, launcher=launcher,
                                     rank_num_cpus=float(rank_num_cpus))
        self._ranks = _ranks
        self.kv_cache = bool(kv_cache)  # sampling keeps a KV cache (False: recompute the sequence every step)
        self.tp, self.dp, self.world = tp, dp, world
        ok = False
        try:
            self._build(dtype, device, max_adapters, max_lora_rank)
            ok = True
        finally:
            if world > 1 and self._ranks is not None:  # world > 1: the ranks were started above
                all_ok = self._ranks.all_ok(ok)
                if not all_ok and self._ranks.leader:
                    self._ranks.close(announce=False)  # no follower serves: each one returns after all_ok
                if ok and not all_ok:
                    raise RuntimeError("another rank of this megatron replica failed to start (see its log)")

    def _build(self, dtype: str, device: str | None, max_adapters: int, max_lora_rank: int) -> None:
        from megatron.core import parallel_state as ps
        from transformers import AutoTokenizer

        init_parallel(self.tp, 1, self.world)
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self._tp_group = ps.get_tensor_model_parallel_group() if self.tp > 1 else None
        self._dp_group = ps.get_data_parallel_group() if self.dp > 1 else None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _DTYPES[dtype]
        self.max_adapters = max_adapters
        self.max_lora_rank = max_lora_rank
        self.model, self.hf_config, self.geometry = load_megatron_model(
            self.path, dtype=self.dtype, device=self.device, tp=self.tp, tp_rank=self.tp_rank)
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.vocab_size = int(self.geometry.vocab)
        self.max_length = int(getattr(self.hf_config, "max_position_embeddings", 2048) or 2048)
        self._routing = RoutingSlot()
        # the transformers backend's vision and gradient-checkpointing state: unused here (no vision tower,
        # megatron's own recompute is not wired), kept so the shared training/sampling code reads it
        self._vision = None
        self._vrouting = RoutingSlot()
        self._ckpt_layers: list[Any] = []
        self._layers: dict[str, Any] = {}
        self._all_shards = [part_shards(self.geometry, self.tp, r) for r in range(self.tp)]
        self._shards = self._all_shards[self.tp_rank]
        self._full_adapters = False
        self._wrap_linears()
        self._adapters = {}
        self._eos = self._eos_ids()
        self._num_parameters = self._count_parameters()

    # -- setup -----------------------------------------------------------------------------------------------
    def _wrap_linears(self) -> None:
        g = self.geometry
        q, kv = g.heads * g.head_dim, g.groups * g.head_dim
        full_in = {"self_attention.linear_qkv": g.hidden, "self_attention.linear_proj": q,
                   "mlp.linear_fc1": g.hidden, "mlp.linear_fc2": g.ffn}
        full_out = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": g.hidden, "gate_proj": g.ffn,
                    "up_proj": g.ffn, "down_proj": g.hidden, "lm_head": g.vocab}
        views: dict[str, _PartView] = {}
        for i in range(g.layers):
            layer = self.model.decoder.layers[i]
            for suffix, parts in FUSED.items():
                parent_name, _, attr = suffix.rpartition(".")
                parent = layer.get_submodule(parent_name)
                wrapped = MegatronMultiLora(getattr(parent, attr), parts, self._shards, self._routing,
                                            in_features=full_in[suffix], out_features=full_out, tp=self.tp)
                setattr(parent, attr, wrapped)
                for part in parts:
                    views[f"model.layers.{i}.{HF_PARENT[part]}.{part}"] = _PartView(wrapped, part)
        head = MegatronMultiLora(self.model.output_layer, ("lm_head",), self._shards, self._routing,
                                 in_features=g.hidden, out_features=full_out, tp=self.tp)
        self.model.output_layer = head
        # HF module order (q, k, v, o, gate, up, down per layer; lm_head last): the LoRA init draws from one
        # generator in this order, exactly as the transformers backend does, so equal seeds give equal adapters.
        order = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        for i in range(g.layers):
            for part in order:
                name = f"model.layers.{i}.{HF_PARENT[part]}.{part}"
                self._layers[name] = views[name]
        self._layers["lm_head"] = _PartView(head, "lm_head")
        self._unembed = "lm_head"

    def _count_parameters(self) -> int:
        """Parameters of the whole (unsharded) base model."""
        sharded = ("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_qkv.bias",
                   "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")
        n = 0
        for name, p in self.model.named_parameters():
            if ".adapters." not in name:
                n += p.numel() * (self.tp if name.replace(".base.", ".").endswith(sharded) else 1)
        pad = padded_vocab(self.geometry, self.tp) - self.geometry.vocab
        return n - pad * self.geometry.hidden * (1 if self.geometry.tied else 2)

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        gc_path = self.path / "generation_config.json"
        gc_eos = json.loads(gc_path.read_text()).get("eos_token_id") if gc_path.is_file() else None
        for src in (gc_eos, getattr(self.hf_config, "eos_token_id", None), self._tokenizer.eos_token_id):
            for x in src if isinstance(src, (list, tuple)) else [src]:
                if isinstance(x, int) and x not in ids:
                    ids.append(x)
        return ids

    def model_info(self) -> ModelInfo:
        arch = (getattr(self.hf_config, "architectures", None) or [self.hf_config.model_type])[0]
        return ModelInfo(model_name=self.model_id, backend=self.name, arch=arch, vocab_size=self.vocab_size,
                         max_length=self.max_length, tokenizer_id=str(self.path), eos_token_ids=self._eos,
                         num_parameters=self._num_parameters)

    # -- adapters (every rank) -------------------------------------------------------------------------------
    def _part(self, module: str) -> str:
        return module.rsplit(".", 1)[-1]

    @collective
    def add_adapter(self, adapter: str, config: LoraConfig, *, _modules: list[str] | None = None) -> None:
        super().add_adapter(adapter, config, _modules=_modules)
        if self.tp > 1 and not self._full_adapters:  # created full-size from the seeded generator, then sliced
            _parallel.shard_state(self._adapters[adapter], lambda m: self._shards[self._part(m)])

    @collective
    def remove_adapter(self, adapter: str) -> None:
        super().remove_adapter(adapter)

    @collective
    def set_optimizer(self, adapter: str, config: OptimizerConfig) -> None:
        super().set_optimizer(adapter, config)

    @collective
    def set_lr_scheduler(self, adapter: str, config: LRSchedulerConfig) -> None:
        super().set_lr_scheduler(adapter, config)

    # -- compute ---------------------------------------------------------------------------------------------
    @collective
    def run_batch(self, items: list[BatchItem]) -> list[ForwardBackwardOutput]:
        return super().run_batch(items)

    @collective
    def sample(self, items: list[SampleItem]) -> list[SampleResponse]:
        return super().sample(items)

    def sampler_engine(self, **kw: Any) -> None:
        """No continuous batching here: every rank must run the same whole-batch sampling loop."""
        return None

    def concurrent_sampling(self) -> bool:
        """No sampling thread beside training: the ranks' collectives must run in one order."""
        return False

    def _forward_logits(self, ids: torch.Tensor, segments: list[Segment], *, train: bool, mask: torch.Tensor | None = None,
                        pos: torch.Tensor | None = None, cache: Any = None, use_cache: bool = False,
                        vision: Any = None, last_only: bool = False,
                        infer: bool = False, lean: bool = True) -> tuple[torch.Tensor, Any]:
        # ``infer`` (packed/merged inference weights) and ``lean`` have no megatron counterpart and are ignored.
        # ``vision`` is always None here: image rows are refused before they are queued (no vision tower).
        # Sampling (use_cache) keeps a KV cache in megatron's StaticInferenceContext (``_kv_cache``). Anything the
        # cache cannot serve takes the whole-sequence path, whose "cache" is the token history: every call then
        # recomputes the sequence. RoPE is relative, so in both paths left padding (masked keys) leaves the real
        # tokens' outputs unchanged and the engine's position ids are not needed.
        self._routing[0] = Routing(segments, dropout=train)
        try:
            if use_cache and not train and (isinstance(cache, _kv_cache.KVCache)
                                            or (cache is None and self._cache_ok())):
                logits, new_cache = self._cached_logits(ids, mask, cache)
            else:
                full = ids if cache is None else torch.cat([cache, ids], dim=1)
                logits = causal_forward(self.model, full, mask)[:, -ids.shape[1]:]
                new_cache = full if use_cache else None
        finally:
            self._routing[0] = None
        if logits.shape[-1] != self.vocab_size:  # the vocabulary was padded to a multiple of the TP size
            logits = logits[..., : self.vocab_size]
        return logits, new_cache

    def _cache_ok(self) -> bool:
        return self.kv_cache and _kv_cache.supported(self.model)

    def _cached_logits(self, ids: torch.Tensor, mask: torch.Tensor | None,
                       cache: _kv_cache.KVCache | None) -> tuple[torch.Tensor, Any]:
        if cache is not None:
            return _kv_cache.forward(self.model, cache, ids, mask), cache
        cache = _kv_cache.start(ids.shape[0], ids.shape[1])
        try:
            return _kv_cache.forward(self.model, cache, ids, mask), cache
        except Exception as e:  # noqa: BLE001 - every rank runs the same code, so all fall back alike
            # a model/layout the inference context cannot handle: stay correct with the whole-sequence path
            _log.warning("megatron KV cache unavailable (%s: %s); sampling recomputes the sequence each step",
                         type(e).__name__, e)
            self.kv_cache = False
            return causal_forward(self.model, ids, mask), ids

    def _row_logprobs(self, tokens: list[np.ndarray], targets: list[np.ndarray], segments: list[Segment],
                      train: bool, images: list[list[Any]] | None = None) -> list[torch.Tensor]:
        if images:  # refused before queueing (no vision tower in the megatron conversion); never reaches here
            raise InvalidInputError("the megatron backend does not support image inputs", field="model_input")
        if self.dp == 1:
            return super()._row_logprobs(tokens, targets, segments, train)
        start, end, per = _parallel.row_range(len(tokens), self.dp, self.dp_rank)
        local: list[torch.Tensor] = []
        if end > start:
            local = super()._row_logprobs(tokens[start:end], targets[start:end],
                                          _parallel.slice_segments(segments, start, end), train)
        return _parallel.gather_rows(local, [tuple(t.shape) for t in targets], per, self._dp_group, self.dp_rank,
                                     self.dp, self.device)

    @collective
    def optim_step(self, adapter: str, params: AdamParams | None = None) -> dict[str, float]:
        return super().optim_step(adapter, params)

    def grad_snapshot(self, adapter: str) -> None:
        """Gradients live on every rank: no snapshot, so the scheduler runs a large request as one pass."""
        return None

    def _reduce_grads(self, params: list[Any]) -> None:
        if self.dp > 1:
            _parallel.allreduce_grads(params, self._dp_group)

    def _grad_norm(self, with_grad: list[Any]) -> float:
        if self.world == 1:
            return super()._grad_norm(with_grad)
        return _parallel.global_grad_norm(with_grad, self._tp_group, self.tp)

    # -- checkpoints -----------------------------------------------------------------------------------------
    @collective
    def save(self, adapter: str, path: Path, *, optimizer: bool = True) -> None:
        st = self._get(adapter)
        if self.tp > 1:  # gather the TP slices: the files are those a TP-1 replica writes
            st = _parallel.full_state(st, lambda m: [s[self._part(m)] for s in self._all_shards], self.tp_rank,
                                      self._tp_group)
        if self._ranks is not None and not self._ranks.leader:
            return
        _checkpoint.save(self, st, Path(path), optimizer=optimizer)
        # the adapter targets the HF architecture; say so for peft/vLLM users
        cfg_p = Path(path) / "adapter_config.json"
        cfg = json.loads(cfg_p.read_text())
        cfg["base_model_name_or_path"] = str(self.path)
        cfg_p.write_text(json.dumps(cfg, indent=2))

    @collective
    def load(self, adapter: str, path: Path, *, optimizer: bool = True) -> LoraConfig:
        # every rank reads the (same-node) files; with TP each keeps its slice
        if self.tp == 1:
            return super().load(adapter, path, optimizer=optimizer)
        self._full_adapters = True
        try:
            config = super().load(adapter, path, optimizer=optimizer)
        finally:
            self._full_adapters = False
        _parallel.shard_state(self._adapters[adapter], lambda m: self._shards[self._part(m)])
        return config

    @collective
    def _close_local(self) -> None:
        super().close()

    def close(self) -> None:
        """Release the adapters on every rank; rank 0 of a multi-rank replica then stops the other ranks."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self._close_local()
        if self._ranks is not None and self._ranks.leader:
            self._ranks.close()


_ranks_mod = _ranks
_log = logging.getLogger(__name__)


def _size(v: Any, kind: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InvalidInputError(f"megatron.{kind}_parallel_size must be a positive integer, got {v!r}",
                                field=f"megatron.{kind}_parallel_size")
    return v


def _check_tp(g: Geometry, tp: int) -> None:
    for what, n in (("attention heads", g.heads), ("key/value heads", g.groups), ("intermediate size", g.ffn)):
        if n % tp:
            raise InvalidInputError(f"tensor_parallel_size {tp} does not divide the model's {what} ({n})",
                                    field="megatron.tensor_parallel_size")

