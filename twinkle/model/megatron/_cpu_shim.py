"""The few shims megatron-core 0.16 needs to run on a CPU (tests, CI, laptops). GPU processes never call this.

megatron-core assumes CUDA in three places we hit with the local (non-Transformer-Engine) layer spec:

1. ``torch.cuda.current_device()`` is used as a ``device=`` argument (rotary embeddings, attention buffers).
   On a CPU-only torch it raises; we make it return ``"cpu"``.
2. ``CudaRNGStatesTracker.fork()`` swaps CUDA RNG states around dropout and initialisation. We run with
   dropout 0 and load converted weights, so forking is a no-op on CPU.
3. ``torch.distributed`` must be initialised; we use gloo with an in-memory store (no ports) for world size 1.
   A multi-rank replica on CPU needs nothing more: ``_ranks`` forms the group exactly as on GPUs, only with
   gloo instead of NCCL (gloo has every collective tensor parallelism uses: all-reduce, all-gather, broadcast).

``apply()`` is idempotent and refuses to run when CUDA is available, so it can never touch the GPU path.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("the megatron CPU shim must not be applied on a machine with CUDA")
    torch.cuda.current_device = lambda: "cpu"

    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    def _fork(self: Any, name: str | None = None) -> contextlib.nullcontext[None]:  # noqa: ARG001 - the original's signature
        return contextlib.nullcontext()

    CudaRNGStatesTracker.fork = _fork
    _applied = True


def init_single_process_group() -> None:
    """World size 1 over gloo with an in-memory store (no network port)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
