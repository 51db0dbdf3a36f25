"""Build a megatron-core GPTModel equivalent to a Hugging Face checkpoint, with converted weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .convert import (
    Geometry,
    geometry,
    hf_to_megatron,
    padded_vocab,
    rope_base,
    shard_megatron,
    transformer_config_kwargs,
)


def init_parallel(tensor_parallel: int = 1, pipeline_parallel: int = 1, world: int = 1) -> None:
    """Initialise torch.distributed (world size 1) and megatron's parallel state once per process.

    With ``world > 1`` the process group already exists (``_ranks`` formed it). At world size 1 a CPU-only
    process uses gloo with an in-memory store and a GPU process NCCL on its current device. On a CPU the
    CPU shims are applied first (``_cpu_shim``; never on a machine with CUDA).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not torch.cuda.is_available():
        from . import _cpu_shim

        _cpu_shim.apply()
        if world == 1:
            _cpu_shim.init_single_process_group()
    elif not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
        torch.cuda.set_device(0)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_parallel, pipeline_parallel)
        if torch.cuda.is_available():
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(0)
    elif (parallel_state.get_tensor_model_parallel_world_size() != tensor_parallel
          or dist.get_world_size() != world):
        raise RuntimeError("megatron's parallel state is already set up with other sizes in this process "
                           "(one megatron backend per process)")


def load_megatron_model(path: str | Path, *, dtype: torch.dtype, device: torch.device, tp: int = 1,
                        tp_rank: int = 0) -> tuple[Any, Any, Geometry]:
    """Returns ``(gpt_model, hf_config, geometry)`` with weights converted from ``path`` (HF layout); with
    ``tp > 1`` the model holds TP rank ``tp_rank``'s shard and returns logits gathered over the vocabulary."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    hf_config = AutoConfig.from_pretrained(str(path))
    g = geometry(hf_config)
    tc = TransformerConfig(**transformer_config_kwargs(hf_config, dtype))
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=g.qk_norm)
    model = GPTModel(
        config=tc,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab(g, tp),
        max_sequence_length=int(getattr(hf_config, "max_position_embeddings", 4096)),
        position_embedding_type="rope",
        rotary_base=int(rope_base(hf_config)),
        share_embeddings_and_output_weights=g.tied,
        pre_process=True,
        post_process=True,
        parallel_output=False,
    )
    sd: dict[str, torch.Tensor] = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    for f in files:
        sd.update(load_file(str(f)))
    if g.tied and "lm_head.weight" in sd:
        sd.pop("lm_head.weight")
    missing, unexpected = model.load_state_dict(
        {k: v.to(dtype) for k, v in shard_megatron(hf_to_megatron(sd, g), g, tp, tp_rank).items()}, strict=False
    )
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"weight conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model, hf_config, g


def causal_forward(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``[b, s, vocab]`` for right-padded ``input_ids`` (``attention_mask`` 1 = real token)."""
    b, s = input_ids.shape
    device = input_ids.device
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, -1)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), diagonal=1)[None, None]
    if attention_mask is not None:
        mask = mask | ~attention_mask.bool()[:, None, None, :]
    return model(input_ids, position_ids, attention_mask=mask)
