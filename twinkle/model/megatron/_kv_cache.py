"""A KV cache for sampling on a megatron-core ``GPTModel``, built on megatron's ``StaticInferenceContext``.

How megatron-core 0.16 uses the context (``transformer/attention.py``, static batching, no flash-decode):

* every self-attention layer allocates ``[max_sequence_length, max_batch_size, groups_per_tp_rank, head_dim]``
  key and value buffers in ``context.key_value_memory_dict[layer_number]`` on its first call, writes the new
  (pre-RoPE) keys/values at ``[sequence_len_offset : sequence_len_offset + s]`` and attends over
  ``[: sequence_len_offset + s]``. With tensor parallelism each rank therefore caches only its own heads;
* RoPE is applied after the cache read, with positions = cache index (queries at ``offset + i``, keys at ``j``).
  RoPE is relative, so for a left-padded row whose real tokens start at cache index ``p`` this is the row's own
  positions shifted by ``p``: the same scores as positions counted from the first real token (the engine's
  ``position_ids``), which megatron's RoPE path does not take anyway;
* the local ``DotProductAttention`` ignores ``attn_mask_type`` and applies exactly the boolean mask it is given
  (True = masked), shaped ``[b, 1, s_new, s_total]``: we pass causal-over-the-new-tokens | left padding;
* the caller advances ``sequence_len_offset`` after each forward.

What we add: the buffers grow (doubling, copied) when a step would run past ``max_sequence_length``, so the
cache is sized by what is generated rather than by the model's maximum length, and all logits of a prefill are
materialised (prompt logprobs need them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_FIRST_ROOM = 64  # decode steps reserved beyond the prompt before the first growth


@dataclass
class KVCache:
    """What the sampling engine hands back to ``_forward_logits`` between steps (opaque to it)."""

    context: Any  # megatron.core.inference.contexts.StaticInferenceContext
    rows: int

    @property
    def length(self) -> int:
        return int(self.context.sequence_len_offset)


def supported(model: Any) -> bool:
    """True when this model's attention can use the static inference context as described above."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(model, "position_embedding_type", None) != "rope":
        return False
    if getattr(cfg, "flash_decode", False) or getattr(cfg, "multi_latent_attention", False):
        return False
    if getattr(cfg, "cuda_graph_impl", "none") not in (None, "none"):
        return False
    return not getattr(cfg, "sequence_parallel", False)


def start(rows: int, length: int) -> KVCache:
    from megatron.core.inference.contexts import StaticInferenceContext

    ctx = StaticInferenceContext(max_batch_size=rows, max_sequence_length=length + _FIRST_ROOM)
    ctx.materialize_only_last_token_logits = False
    return KVCache(ctx, rows)


def _reserve(cache: KVCache, need: int) -> None:
    """Grow every layer's key/value buffers so that ``need`` positions fit (doubling: amortised O(1) per token)."""
    ctx = cache.context
    if need <= ctx.max_sequence_length:
        return
    new_len = max(need, 2 * ctx.max_sequence_length)
    used = ctx.sequence_len_offset
    for layer, (k, v) in list(ctx.key_value_memory_dict.items()):
        nk, nv = k.new_empty((new_len, *k.shape[1:])), v.new_empty((new_len, *v.shape[1:]))
        nk[:used], nv[:used] = k[:used], v[:used]
        ctx.key_value_memory_dict[layer] = (nk, nv)
    ctx.max_sequence_length = new_len


def step_mask(cache: KVCache, n_new: int, key_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Boolean ``[b, 1, n_new, offset + n_new]`` mask (True = masked) for ``n_new`` tokens appended to the cache.

    ``key_mask`` is the engine's attention mask over every position so far including the new ones (1 = real
    token), or None when no row is padded.
    """
    o = cache.length
    total = o + n_new
    q = torch.arange(o, total, device=device)[:, None]
    k = torch.arange(total, device=device)[None, :]
    mask = (k > q)[None, None]
    if key_mask is not None:
        if key_mask.shape != (cache.rows, total):
            raise ValueError(f"attention mask of shape {tuple(key_mask.shape)}; the cache expects "
                             f"{(cache.rows, total)}")
        mask = mask | ~key_mask.bool()[:, None, None, :]
    return mask


def forward(model: Any, cache: KVCache, ids: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Logits ``[b, n, vocab]`` of ``ids`` ``[b, n]`` appended to the cache (the first call is the prefill)."""
    b, n = ids.shape
    if b != cache.rows:
        raise ValueError(f"{b} rows; the cache holds {cache.rows}")
    _reserve(cache, cache.length + n)
    mask = step_mask(cache, n, key_mask, ids.device)
    pos = torch.arange(cache.length, cache.length + n, device=ids.device)[None].expand(b, -1)
    ctx = cache.context
    if cache.length > 0:
        ctx.enable_decode_mode()
    logits = model(ids, pos, attention_mask=mask, inference_context=ctx, runtime_gather_output=True)
    ctx.increment_sequence_len_offset(n)
    return logits
