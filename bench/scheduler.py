"""Scheduler overhead and batching, measured side by side in one run (no torch needed).

1. Round trip of a trivial op (set_lr_scheduler on a no-op backend): a direct backend call vs the same call
   through ``Scheduler.submit`` (loop -> backend thread -> loop). The difference is the scheduler's overhead.
2. N adapters each submitting forward_backward at once against a backend whose cost is a fixed time per call
   plus a time per row: backend calls and wall time with mixed batching vs one call per request.

    .venv/bin/python bench/scheduler.py [--n 2000] [--adapters 8]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from twinkle.model.base import Backend, BatchItem
from twinkle.server.ops import ForwardBackwardOp, SetSchedulerOp
from twinkle.server.scheduler import Scheduler, SchedulerConfig
from twinkle.types import (
    ForwardBackwardOutput,
    LoraConfig,
    LRSchedulerConfig,
    ModelInfo,
    datum_from_tokens,
)


class _CostBackend(Backend):
    """No real compute: each run_batch sleeps ``call_s + row_s * rows`` (a GPU pass has a fixed cost)."""

    name = "cost"

    def __init__(self, call_s: float = 0.0, row_s: float = 0.0) -> None:
        self.call_s, self.row_s, self.calls = call_s, row_s, 0

    def model_info(self) -> ModelInfo:
        return ModelInfo(model_name="cost", backend="cost", vocab_size=100, max_length=64)

    def add_adapter(self, adapter: str, config: LoraConfig) -> None: ...
    def remove_adapter(self, adapter: str) -> None: ...
    def list_adapters(self) -> list[str]: return []
    def adapter_config(self, adapter: str) -> LoraConfig: return LoraConfig()
    def set_optimizer(self, adapter, config) -> None: ...
    def set_lr_scheduler(self, adapter, config) -> None: ...
    def step_count(self, adapter: str) -> int: return 0

    def run_batch(self, items: list[BatchItem]) -> list[ForwardBackwardOutput]:
        self.calls += 1
        rows = sum(len(it.data) for it in items)
        if self.call_s or self.row_s:
            time.sleep(self.call_s + self.row_s * rows)
        return [ForwardBackwardOutput(metrics={"loss:sum": 0.0}) for _ in items]

    def optim_step(self, adapter, params=None): return {}
    def sample(self, items): return []
    def save(self, adapter: str, path: Path, *, optimizer: bool = True) -> None: ...
    def load(self, adapter: str, path: Path, *, optimizer: bool = True) -> LoraConfig: return LoraConfig()


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


async def _round_trip(n: int) -> tuple[list[float], list[float]]:
    backend = _CostBackend()
    sched = Scheduler(backend)
    op = SetSchedulerOp(LRSchedulerConfig())
    direct, through = [], []
    for _ in range(200):  # warm up
        await sched.submit("a", op)
    for _ in range(n):
        t0 = time.perf_counter()
        backend.set_lr_scheduler("a", op.scheduler)
        direct.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await sched.submit("a", op)
        through.append(time.perf_counter() - t0)
    await sched.close()
    return direct, through


async def _throughput(adapters: int, rounds: int, batching: bool) -> tuple[float, int]:
    backend = _CostBackend(call_s=0.004, row_s=0.0005)
    cfg = SchedulerConfig(max_batch_items=256 if batching else 1)
    sched = Scheduler(backend, cfg)
    data = [datum_from_tokens([1, 2, 3, 4])]

    async def client(a: str) -> None:
        for s in range(1, rounds + 1):
            await sched.submit(a, ForwardBackwardOp(data=data), seq_id=s, tokens=3)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(f"a{i}") for i in range(adapters)))
    wall = time.perf_counter() - t0
    await sched.close()
    return wall, backend.calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()

    direct, through = asyncio.run(_round_trip(args.n))
    d50, t50 = statistics.median(direct) * 1e6, statistics.median(through) * 1e6
    print(f"\nTrivial op round trip ({args.n} calls)")
    print(f"{'path':<28}{'p50 us':>10}{'p99 us':>10}")
    print(f"{'direct backend call':<28}{d50:>10.1f}{_pct(direct, 0.99) * 1e6:>10.1f}")
    print(f"{'through scheduler':<28}{t50:>10.1f}{_pct(through, 0.99) * 1e6:>10.1f}")
    print(f"scheduler overhead p50: {t50 - d50:.1f} us")

    solo_wall, solo_calls = asyncio.run(_throughput(args.adapters, args.rounds, batching=False))
    mix_wall, mix_calls = asyncio.run(_throughput(args.adapters, args.rounds, batching=True))
    total = args.adapters * args.rounds
    print(f"\n{args.adapters} adapters x {args.rounds} forward_backward (backend: 4 ms/call + 0.5 ms/row)")
    print(f"{'mode':<28}{'calls':>8}{'wall s':>10}{'req/s':>10}")
    print(f"{'one request per call':<28}{solo_calls:>8}{solo_wall:>10.3f}{total / solo_wall:>10.1f}")
    print(f"{'mixed batches':<28}{mix_calls:>8}{mix_wall:>10.3f}{total / mix_wall:>10.1f}")
    print(f"throughput ratio mixed/solo: {solo_wall / mix_wall:.2f}x")


if __name__ == "__main__":
    main()
