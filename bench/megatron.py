"""Megatron vs transformers backend: LoRA training tokens/s on the same model and batches, side by side.

Steps of the two backends are interleaved so machine noise hits both alike. On a GPU run it with
``--dtype bfloat16``; on CPU it runs in fp32 (a correctness-path figure, not a speed claim).
Usage: python bench/megatron.py [--model builtin://small] [--batch 8] [--seq 128] [--steps 10] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# this file is named megatron.py: keep its folder off sys.path so `import megatron` finds megatron-core
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from twinkle.model.base import BatchItem  # noqa: E402
from twinkle.types import AdamParams, LoraConfig, datum_from_tokens  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin://small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    from twinkle.model.megatron import MegatronBackend
    from twinkle.model.transformers import TransformersBackend

    systems = {
        "transformers": TransformersBackend(args.model, dtype=args.dtype),
        "megatron": MegatronBackend(args.model, dtype=args.dtype),
    }
    vocab = systems["transformers"].vocab_size
    rng = np.random.default_rng(0)
    batches = [[datum_from_tokens(rng.integers(0, vocab, args.seq + 1).tolist()) for _ in range(args.batch)]
               for _ in range(args.steps + 2)]
    times: dict[str, list[float]] = {k: [] for k in systems}
    losses: dict[str, list[float]] = {k: [] for k in systems}
    for b in systems.values():
        b.add_adapter("bench", LoraConfig(rank=args.rank, seed=0))
    for i, batch in enumerate(batches):
        for name, b in systems.items():
            _sync()
            t = time.perf_counter()
            out = b.run_batch([BatchItem("bench", batch)])
            b.optim_step("bench", AdamParams(learning_rate=1e-3, eps=1e-8))
            _sync()
            if i >= 2:  # warm-up
                times[name].append(time.perf_counter() - t)
                losses[name].append(out[0].metrics["loss:sum"])
    tokens = args.batch * args.seq
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"model={args.model} device={device} dtype={args.dtype} batch={args.batch}x{args.seq} rank={args.rank}")
    print(f"{'backend':<14}{'p50 step (ms)':>15}{'tokens/s':>12}{'ratio':>8}")
    ref = tokens / statistics.median(times["transformers"])
    for name in systems:
        tps = tokens / statistics.median(times[name])
        print(f"{name:<14}{statistics.median(times[name]) * 1e3:>15.1f}{tps:>12.0f}{tps / ref:>8.2f}")
    gap = max(abs(a - b) / abs(a) for a, b in zip(losses["transformers"], losses["megatron"], strict=True))
    print(f"max relative loss difference over {len(losses['megatron'])} steps: {gap:.2e}")


if __name__ == "__main__":
    main()
