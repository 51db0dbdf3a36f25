"""Hugging Face (Qwen2 / Qwen3 / Llama / Mistral family) ↔ megatron-core: config and weight conversion.

Megatron fuses q/k/v into ``linear_qkv`` laid out per query group: for group g, the rows are
``[q heads of g (heads_per_group·head_dim), k_g (head_dim), v_g (head_dim)]``; and gate/up into ``linear_fc1``
as ``[gate; up]``. ``hf_to_megatron`` builds that layout; ``qkv_slices`` tells where each HF projection's
rows live, which the LoRA layers use to place per-projection deltas exactly where HF would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from twinkle.types import UnsupportedError

SUPPORTED = ("qwen2", "qwen3", "llama", "mistral")


@dataclass(frozen=True)
class Geometry:
    hidden: int
    ffn: int
    layers: int
    heads: int
    groups: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.groups


def geometry(hf_config: Any) -> Geometry:
    mt = getattr(hf_config, "model_type", "")
    if mt not in SUPPORTED:
        raise UnsupportedError(
            f"the megatron backend converts {', '.join(SUPPORTED)} models; this one is {mt!r}", field="model_id"
        )
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return Geometry(
        hidden=hf_config.hidden_size,
        ffn=hf_config.intermediate_size,
        layers=hf_config.num_hidden_layers,
        heads=heads,
        groups=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=hf_config.vocab_size,
        tied=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=mt == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
        qk_norm=mt == "qwen3",
    )


def transformer_config_kwargs(hf_config: Any, dtype: torch.dtype) -> dict[str, Any]:
    """Arguments for ``megatron.core.transformer.TransformerConfig`` equivalent to the HF model."""
    import torch.nn.functional as F

    g = geometry(hf_config)
    return dict(
        num_layers=g.layers,
        hidden_size=g.hidden,
        ffn_hidden_size=g.ffn,
        num_attention_heads=g.heads,
        num_query_groups=g.groups,
        kv_channels=g.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=float(getattr(hf_config, "rms_norm_eps", 1e-6)),
        add_bias_linear=False,
        add_qkv_bias=g.qkv_bias,
        qk_layernorm=g.qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        bias_activation_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
    )


def rope_base(hf_config: Any) -> float:
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:
        rp = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
        theta = rp.get("rope_theta", 10000.0) if isinstance(rp, dict) else 10000.0
    return float(theta)


def qkv_slices(g: Geometry) -> dict[str, torch.Tensor]:
    """Row indices of megatron's fused qkv output that hold HF's q/k/v projection rows, in HF order."""
    per_group = (g.heads_per_group + 2) * g.head_dim
    q, k, v = [], [], []
    for grp in range(g.groups):
        base = grp * per_group
        q.append(torch.arange(base, base + g.heads_per_group * g.head_dim))
        k0 = base + g.heads_per_group * g.head_dim
        k.append(torch.arange(k0, k0 + g.head_dim))
        v.append(torch.arange(k0 + g.head_dim, k0 + 2 * g.head_dim))
    return {"q_proj": torch.cat(q), "k_proj": torch.cat(k), "v_proj": torch.cat(v)}


def hf_to_megatron(sd: dict[str, torch.Tensor], g: Geometry) -> dict[str, torch.Tensor]:
    """HF ``model.*`` / ``lm_head`` state dict → megatron GPTModel state dict (TP size 1)."""
    out: dict[str, torch.Tensor] = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"]}
    sl = qkv_slices(g)
    qkv_rows = (g.heads + 2 * g.groups) * g.head_dim
    for i in range(g.layers):
        p, q = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[q + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "pre_mlp_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"]
        w = torch.empty(qkv_rows, g.hidden, dtype=sd[p + "self_attn.q_proj.weight"].dtype)
        for name, rows in sl.items():
            w[rows] = sd[p + f"self_attn.{name}.weight"]
        out[q + "self_attention.linear_qkv.weight"] = w
        if g.qkv_bias:
            b = torch.empty(qkv_rows, dtype=w.dtype)
            for name, rows in sl.items():
                b[rows] = sd[p + f"self_attn.{name}.bias"]
            out[q + "self_attention.linear_qkv.bias"] = b
        if g.qk_norm:
            out[q + "self_attention.q_layernorm.weight"] = sd[p + "self_attn.q_norm.weight"]
            out[q + "self_attention.k_layernorm.weight"] = sd[p + "self_attn.k_norm.weight"]
        out[q + "self_attention.linear_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[q + "mlp.linear_fc1.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]], 0)
        out[q + "mlp.linear_fc2.weight"] = sd[p + "mlp.down_proj.weight"]
    out["decoder.final_layernorm.weight"] = sd["model.norm.weight"]
    if not g.tied:
        out["output_layer.weight"] = sd["lm_head.weight"]
    return out


# -- tensor parallelism ------------------------------------------------------------------------------------------
# With TP size N, rank r holds: the r-th contiguous chunk of query groups of ``linear_qkv`` (the per-group layout
# keeps each group's q/k/v rows together, so that is a plain row chunk), ``[gate_r; up_r]`` of ``linear_fc1``
# (megatron's gated MLP splits the local output in two halves), the r-th column chunk of ``linear_proj`` and
# ``linear_fc2`` (their inputs are the local heads / local ffn features), and the r-th row chunk of the vocabulary
# (padded to a multiple of N) of the embedding and output layer. Norms are replicated.


def padded_vocab(g: Geometry, tp: int) -> int:
    """Vocabulary size rounded up to a multiple of ``tp`` (megatron splits the vocabulary evenly)."""
    return -(-g.vocab // tp) * tp


def _chunk(t: torch.Tensor, tp: int, rank: int, dim: int) -> torch.Tensor:
    return t.chunk(tp, dim=dim)[rank].contiguous()


def shard_megatron(sd: dict[str, torch.Tensor], g: Geometry, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """A TP-size-1 megatron state dict (``hf_to_megatron``) → the shard TP rank ``rank`` of ``tp`` holds."""
    if tp == 1:
        return sd
    out: dict[str, torch.Tensor] = {}
    pv = padded_vocab(g, tp)
    for k, v in sd.items():
        if k in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if pv != v.shape[0]:
                v = torch.cat([v, v.new_zeros(pv - v.shape[0], *v.shape[1:])], 0)
            out[k] = _chunk(v, tp, rank, 0)
        elif k.endswith(("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")):
            out[k] = _chunk(v, tp, rank, 0)
        elif k.endswith("mlp.linear_fc1.weight"):
            gate, up = v[: g.ffn], v[g.ffn:]
            out[k] = torch.cat([_chunk(gate, tp, rank, 0), _chunk(up, tp, rank, 0)], 0)
        elif k.endswith(("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")):
            out[k] = _chunk(v, tp, rank, 1)
        else:
            out[k] = v
    return out
