"""``MegatronBackend``: the transformers backend's contract on a megatron-core GPTModel.

Everything that does not depend on the network itself (adapter bookkeeping, losses, optimizer steps, the
KV-free sampling loop, peft-format checkpoints) is inherited from ``TransformersBackend``. What differs:

* the model is a megatron-core ``GPTModel`` built from the HF checkpoint's config, weights converted on load
  (``convert.py``);
* LoRA lives on megatron's fused linear layers, one ``LoraPair`` per HF projection (``_lora.py``), so adapters
  are addressed by their HF module names (``model.layers.0.self_attn.q_proj``…). Checkpoints are therefore
  written in the peft format for the HF architecture, and load into the transformers backend, peft or vLLM;
* sampling recomputes the sequence at each step instead of keeping a KV cache (fine for the CPU/toy path;
  ``docs/megatron.md`` lists this).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import torch

from twinkle.model.transformers._lora import LoraPair, Routing, Segment
from twinkle.model.transformers.backend import _DTYPES, TransformersBackend, _resolve_path
from twinkle.types import InvalidInputError, ModelInfo

from ._lora import FUSED, HF_PARENT, MegatronMultiLora, output_rows
from ._model import causal_forward, init_parallel, load_megatron_model


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
                 **_ignored: Any) -> None:
        from transformers import AutoTokenizer

        if dtype not in _DTYPES:
            raise InvalidInputError(f"unknown dtype {dtype!r}; one of {sorted(_DTYPES)}", field="dtype")
        init_parallel(tensor_parallel_size, pipeline_parallel_size)
        self.model_id = model_id
        self.path = _resolve_path(model_id)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _DTYPES[dtype]
        self.max_adapters = max_adapters
        self.max_lora_rank = max_lora_rank
        self.model, self.hf_config, self.geometry = load_megatron_model(self.path, dtype=self.dtype, device=self.device)
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.vocab_size = int(self.geometry.vocab)
        self.max_length = int(getattr(self.hf_config, "max_position_embeddings", 2048) or 2048)
        self._routing: list[Routing | None] = [None]
        self._layers: dict[str, Any] = {}
        self._wrap_linears()
        self._adapters = {}
        self._eos = self._eos_ids()

    # -- setup -----------------------------------------------------------------------------------------------
    def _wrap_linears(self) -> None:
        rows = output_rows(self.geometry)
        views: dict[str, _PartView] = {}
        for i in range(self.geometry.layers):
            layer = self.model.decoder.layers[i]
            for suffix, parts in FUSED.items():
                parent_name, _, attr = suffix.rpartition(".")
                parent = layer.get_submodule(parent_name)
                base = getattr(parent, attr)
                wrapped = MegatronMultiLora(base, parts, rows, self._routing, in_features=base.weight.shape[1],
                                            out_features=base.weight.shape[0])
                setattr(parent, attr, wrapped)
                for part in parts:
                    views[f"model.layers.{i}.{HF_PARENT[part]}.{part}"] = _PartView(wrapped, part)
        head = MegatronMultiLora(self.model.output_layer, ("lm_head",), rows, self._routing,
                                 in_features=self.geometry.hidden, out_features=self.geometry.vocab)
        self.model.output_layer = head
        # HF module order (q, k, v, o, gate, up, down per layer; lm_head last): the LoRA init draws from one
        # generator in this order, exactly as the transformers backend does, so equal seeds give equal adapters.
        order = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        for i in range(self.geometry.layers):
            for part in order:
                name = f"model.layers.{i}.{HF_PARENT[part]}.{part}"
                self._layers[name] = views[name]
        self._layers["lm_head"] = _PartView(head, "lm_head")
        self._unembed = "lm_head"

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
        n = sum(p.numel() for name, p in self.model.named_parameters() if ".adapters." not in name)
        return ModelInfo(model_name=self.model_id, backend=self.name, arch=arch, vocab_size=self.vocab_size,
                         max_length=self.max_length, tokenizer_id=str(self.path), eos_token_ids=self._eos,
                         num_parameters=n)

    # -- compute ---------------------------------------------------------------------------------------------
    def _forward_logits(self, ids: torch.Tensor, segments: list[Segment], *, train: bool, mask: torch.Tensor | None = None,
                        pos: torch.Tensor | None = None, cache: Any = None, use_cache: bool = False) -> tuple[torch.Tensor, Any]:
        # No KV cache: the "cache" is the token history; each call recomputes the whole sequence. RoPE is
        # relative, so left padding (masked keys) leaves the real tokens' outputs unchanged.
        full = ids if cache is None else torch.cat([cache, ids], dim=1)
        self._routing[0] = Routing(segments, dropout=train)
        try:
            logits = causal_forward(self.model, full, mask)
        finally:
            self._routing[0] = None
        return logits[:, -ids.shape[1]:], (full if use_cache else None)

    def save(self, adapter: str, path: Path, *, optimizer: bool = True) -> None:
        super().save(adapter, path, optimizer=optimizer)
        # the adapter targets the HF architecture; say so for peft/vLLM users
        cfg_p = Path(path) / "adapter_config.json"
        cfg = json.loads(cfg_p.read_text())
        cfg["base_model_name_or_path"] = str(self.path)
        cfg_p.write_text(json.dumps(cfg, indent=2))
