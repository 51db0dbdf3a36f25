"""Mock backend speed, measured side by side in one run (numpy only, no torch).

1. Training steps (forward_backward + optim_step) per second on three workloads: one short chat example,
   a batch of 8 x 128 tokens, and the bundled self-cognition set (80 conversations) as one batch.
2. One 4-adapter mixed batch vs 4 sequential single-adapter batches on the same rows (ratio of times).

    .venv/bin/python bench/mock.py [--steps 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from twinkle.data import ChatEncoder, self_cognition_dataset, to_datums
from twinkle.model.base import BatchItem
from twinkle.model.mock import MockBackend
from twinkle.types import Datum, LoraConfig, OptimizerConfig, datum_from_tokens


def _train(b: MockBackend, adapter: str, data: list[Datum], steps: int) -> tuple[float, float, float]:
    t = time.perf_counter()
    first = last = 0.0
    for s in range(steps):
        loss = b.run_batch([BatchItem(adapter, data)])[0].metrics["loss:sum"]
        b.optim_step(adapter)
        first = loss if s == 0 else first
        last = loss
    return time.perf_counter() - t, first, last


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    b = MockBackend("mock://tiny", seed=0)
    tok = b.tokenizer()
    rng = np.random.default_rng(0)
    chat = [datum_from_tokens(tok.apply_chat_template(
        [{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "I am Twinkle."}]))]
    rows = [datum_from_tokens(rng.integers(0, 256, 129).tolist()) for _ in range(8)]
    selfcog = to_datums([ChatEncoder(tok)(r) for r in self_cognition_dataset()])
    workloads = [("1 chat example", chat, args.steps), ("8 x 128 tokens", rows, args.steps),
                 ("self-cognition (80 convs)", selfcog, max(3, args.steps // 10))]
    print(f"{'workload':<28}{'tokens/step':>12}{'steps':>7}{'seconds':>9}{'steps/s':>9}{'loss first->last':>22}")
    for i, (name, data, steps) in enumerate(workloads):
        b.add_adapter(f"w{i}", LoraConfig(rank=8))
        b.set_optimizer(f"w{i}", OptimizerConfig(lr=1e-2))
        secs, first, last = _train(b, f"w{i}", data, steps)
        ntok = sum(d.model_input.length for d in data)
        print(f"{name:<28}{ntok:>12}{steps:>7}{secs:>9.3f}{steps / secs:>9.1f}{first:>11.2f} -> {last:<9.3f}")

    adapters = [f"m{k}" for k in range(4)]
    for a in adapters:
        b.add_adapter(a, LoraConfig(rank=8, seed=hash(a) % 1000))
    mixed_t, seq_t = [], []
    for _ in range(20):  # alternate the two so that machine load hits both alike; report medians
        t = time.perf_counter()
        b.run_batch([BatchItem(a, rows[:2], forward_only=True) for a in adapters])
        mixed_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        for a in adapters:
            b.run_batch([BatchItem(a, rows[:2], forward_only=True)])
        seq_t.append(time.perf_counter() - t)
    mixed, seq = statistics.median(mixed_t), statistics.median(seq_t)
    print(f"\n{'4 adapters x 2 rows':<28}{'mixed (ms)':>12}{'sequential (ms)':>17}{'seq/mixed':>11}")
    print(f"{'forward':<28}{mixed * 1e3:>12.2f}{seq * 1e3:>17.2f}{seq / mixed:>11.2f}")


if __name__ == "__main__":
    main()
