"""Megatron vs transformers backend: LoRA training tokens/s on the same model and batches, side by side; then
megatron sampling tokens/s with and without the KV cache.

Steps of the two backends are interleaved so machine noise hits both alike (likewise the cached and uncached
sampling runs). On a GPU run it with ``--dtype bfloat16``; on CPU it runs in fp32 (a correctness-path figure,
not a speed claim).
Usage: python bench/megatron.py [--model builtin://small] [--batch 8] [--seq 128] [--steps 10] [--dtype float32]
       [--sample-batch 4] [--sample-prompt 32] [--sample-tokens 64] [--sample-runs 3] [--only-sampling]
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

from twinkle.model.base import BatchItem, SampleItem  # noqa: E402
from twinkle.types import AdamParams, LoraConfig, SamplingParams, datum_from_tokens  # noqa: E402


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
    ap.add_argument("--sample-batch", type=int, default=4)
    ap.add_argument("--sample-prompt", type=int, default=32)
    ap.add_argument("--sample-tokens", type=int, default=64)
    ap.add_argument("--sample-runs", type=int, default=3)
    ap.add_argument("--only-sampling", action="store_true")
    args = ap.parse_args()
    if not args.only_sampling:
        _training(args)
    _sampling(args)


def _training(args: argparse.Namespace) -> None:
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


def _sampling(args: argparse.Namespace) -> None:
    """Generate ``--sample-tokens`` greedy tokens for ``--sample-batch`` prompts (left-padded: lengths differ by
    a few tokens), megatron with vs without the KV cache; the two runs alternate, tokens must agree."""
    from twinkle.model.megatron import MegatronBackend

    mg = MegatronBackend(args.model, dtype=args.dtype)
    rng = np.random.default_rng(1)
    params = SamplingParams(max_tokens=args.sample_tokens, temperature=0.0, stop=[])
    items = [SampleItem(None, rng.integers(0, mg.vocab_size, args.sample_prompt - 3 * i).tolist(), 1, params)
             for i in range(args.sample_batch)]
    times: dict[bool, list[float]] = {True: [], False: []}
    tokens: dict[bool, list[list[int]]] = {}
    for i in range(args.sample_runs + 1):
        for cached in (True, False):
            mg.kv_cache = cached
            _sync()
            t = time.perf_counter()
            out = mg.sample(items)
            _sync()
            if i >= 1:  # warm-up
                times[cached].append(time.perf_counter() - t)
            tokens[cached] = [s.tokens for r in out for s in r.sequences]
    mg.close()
    n = sum(len(t) for t in tokens[True])
    print(f"\nsampling: megatron, batch={args.sample_batch} prompts of {args.sample_prompt - 3 * (args.sample_batch - 1)}"
          f"..{args.sample_prompt} tokens, {args.sample_tokens} new tokens each (greedy), p50 of {args.sample_runs}")
    print(f"{'kv cache':<14}{'p50 run (s)':>15}{'tokens/s':>12}{'ratio':>8}")
    ref = n / statistics.median(times[False])
    for cached in (False, True):
        tps = n / statistics.median(times[cached])
        print(f"{('on' if cached else 'off'):<14}{statistics.median(times[cached]):>15.2f}{tps:>12.0f}{tps / ref:>8.2f}")
    print(f"same tokens with and without the cache: {tokens[True] == tokens[False]}")


if __name__ == "__main__":
    main()
