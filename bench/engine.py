"""Training-engine throughput, measured side by side in one run (no wall-clock assertions anywhere).

1. Our LoRA training step (TransformersBackend.run_batch + optim_step) vs a plain PyTorch + peft loop on the
   same batches, same LoRA targets/rank, same summed token cross-entropy and AdamW. Target: ratio >= 0.95.
2. One mixed batch of 4 adapters vs the same rows as 4 sequential single-adapter batches.

Steps of the two systems are interleaved (alternating which goes first) so machine noise hits both alike;
the table shows the fastest step of each, timed as process CPU time on CPU (so other processes on a shared
machine do not distort the ratio) and wall-clock time on GPU.
Usage: python bench/engine.py [--model builtin://small] [--batch 8] [--seq 128] [--steps 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from twinkle.model.base import BatchItem
from twinkle.model.transformers import TransformersBackend
from twinkle.types import Datum, LoraConfig, ModelInput, OptimizerConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batches(n: int, b: int, seq: int, vocab: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=(b, seq + 1)) for _ in range(n)]


def _datums(arr: np.ndarray) -> list[Datum]:
    return [Datum(model_input=ModelInput.from_ints(r[:-1].tolist()),
                  loss_fn_inputs={"target_tokens": r[1:], "weights": np.ones(r.size - 1, np.float32)}) for r in arr]


def _timed(fn) -> float:
    """Seconds of one call: CPU time of this process on CPU (other load on a shared machine does not count),
    wall-clock time on GPU."""
    cuda = torch.cuda.is_available()
    clock = time.perf_counter if cuda else time.process_time
    t = clock()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return clock() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin://small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is stable on a shared machine)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    ours = TransformersBackend(args.model, device=args.device)
    dev = ours.device
    vocab = ours.vocab_size
    ours.add_adapter("a0", LoraConfig(rank=args.rank, alpha=2 * args.rank, target_modules=TARGETS, seed=0))
    ours.set_optimizer("a0", OptimizerConfig(lr=1e-4))

    base = AutoModelForCausalLM.from_pretrained(str(ours.path), dtype=torch.float32, attn_implementation="sdpa").to(dev)
    pm = get_peft_model(base, PeftLoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS))
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95), eps=1e-8)

    def peft_step(arr: np.ndarray) -> None:
        x = torch.from_numpy(arr).to(dev)
        logits = pm(input_ids=x[:, :-1]).logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def our_step(data: list[Datum]) -> None:
        ours.run_batch([BatchItem("a0", data)])
        ours.optim_step("a0")

    batches = _batches(args.steps + 2, args.batch, args.seq, vocab, seed=0)
    datums = [_datums(a) for a in batches]
    t_ours, t_peft = [], []
    for i, (arr, data) in enumerate(zip(batches, datums, strict=True)):
        if i % 2 == 0:  # alternate which system goes first
            a = _timed(lambda d=data: our_step(d))
            b = _timed(lambda x=arr: peft_step(x))
        else:
            b = _timed(lambda x=arr: peft_step(x))
            a = _timed(lambda d=data: our_step(d))
        if i >= 2:  # warm-up
            t_ours.append(a)
            t_peft.append(b)
    tokens = args.batch * args.seq
    mo, mp = min(t_ours), min(t_peft)

    # 4 adapters: one mixed batch vs 4 sequential batches (same rows, rows per adapter = batch / 4)
    names = [f"m{i}" for i in range(4)]
    for i, n in enumerate(names):
        ours.add_adapter(n, LoraConfig(rank=args.rank, target_modules=TARGETS, seed=i))
    per = max(1, args.batch // 4)
    t_mixed, t_seq = [], []
    for i, data in enumerate(datums):
        items = [BatchItem(n, data[k * per:(k + 1) * per]) for k, n in enumerate(names)]

        def mixed(items: list[BatchItem] = items) -> None:
            ours.run_batch(items)
            for n in names:
                ours.optim_step(n)

        def sequential(items: list[BatchItem] = items) -> None:
            for it in items:
                ours.run_batch([it])
            for n in names:
                ours.optim_step(n)

        if i % 2 == 0:
            a, b = _timed(mixed), _timed(sequential)
        else:
            b, a = _timed(sequential), _timed(mixed)
        if i >= 2:
            t_mixed.append(a)
            t_seq.append(b)
    mm, ms = min(t_mixed), min(t_seq)
    mtok = per * 4 * args.seq

    info = ours.model_info()
    print(f"model {args.model} ({info.num_parameters / 1e6:.1f}M params) on {dev}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}x{args.seq}, LoRA rank {args.rank} on {len(ours._adapters['a0'].modules)} linears, "
          f"best of {len(t_ours)} steps (interleaved; the minimum is least disturbed by other load)")
    print(f"{'case':<46}{'ms/step':>10}{'tokens/s':>12}{'ratio':>9}")
    print(f"{'plain PyTorch + peft loop':<46}{mp * 1e3:>10.1f}{tokens / mp:>12.0f}{'':>9}")
    print(f"{'twinkle TransformersBackend (1 adapter)':<46}{mo * 1e3:>10.1f}{tokens / mo:>12.0f}{mp / mo:>9.3f}")
    print(f"{'4 adapters as 4 sequential batches':<46}{ms * 1e3:>10.1f}{mtok / ms:>12.0f}{'':>9}")
    print(f"{'4 adapters in one mixed batch':<46}{mm * 1e3:>10.1f}{mtok / mm:>12.0f}{ms / mm:>9.3f}")
    print("ratio = throughput relative to the row above it (twinkle/peft target >= 0.95; mixed/sequential)")


if __name__ == "__main__":
    main()
