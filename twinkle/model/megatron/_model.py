"""Build a megatron-core GPTModel equivalent to a Hugging Face checkpoint, with converted weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .convert import Geometry, geometry, hf_to_megatron, rope_base, transformer_config_kwargs


def init_parallel(tensor_parallel: int = 1, pipeline_parallel: int = 1) -> None:
    """Initialise torch.distributed + megatron's parallel state once per process.

    On a CPU-only machine this applies the CPU shims and uses a world of size 1 over gloo. On GPUs the
    process group must already exist (the replica's launcher starts one process per GPU) or is created
    here for a single GPU.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not torch.cuda.is_available():
        from . import _cpu_shim

        _cpu_shim.apply()
        _cpu_shim.init_single_process_group()
        if tensor_parallel * pipeline_parallel != 1:
            from twinkle.types import InvalidInputError

            raise InvalidInputError(
                "tensor/pipeline parallel sizes above 1 need GPUs; on CPU the megatron backend runs with world size 1",
                field="megatron.tensor_parallel_size",
            )
    elif not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
        torch.cuda.set_device(0)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_parallel, pipeline_parallel)
        if torch.cuda.is_available():
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(0)


def load_megatron_model(path: str | Path, *, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any, Geometry]:
    """Returns ``(gpt_model, hf_config, geometry)`` with weights converted from ``path`` (HF layout)."""
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
        vocab_size=g.vocab,
        max_sequence_length=int(getattr(hf_config, "max_position_embeddings", 4096)),
        position_embedding_type="rope",
        rotary_base=int(rope_base(hf_config)),
        share_embeddings_and_output_weights=g.tied,
        pre_process=True,
        post_process=True,
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
        {k: v.to(dtype) for k, v in hf_to_megatron(sd, g).items()}, strict=False
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
