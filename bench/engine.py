"""Training-engine throughput, measured side by side in one run (no wall-clock assertions anywhere).

1. Our LoRA training step (TransformersBackend.run_batch + optim_step) vs a plain PyTorch + peft loop on the
   same batches, same LoRA targets/rank, same summed token cross-entropy and AdamW. Target: ratio >= 0.95.
2. One mixed batch of 4 adapters vs the same rows as 4 sequential single-adapter batches.
3. Sequence packing (model option ``packing``) vs one datum per padded row, on GRPO-like batches of varied
   lengths (``--min-len``..``--max-len``, one adapter and 4 adapters mixed): the padding fraction of each
   layout and training tokens/s (real tokens only).

Steps of the two systems are interleaved (alternating which goes first) so machine noise hits both alike;
the table shows the fastest step of each, timed as process CPU time on CPU (so other processes on a shared
machine do not distort the ratio) and wall-clock time on GPU.
Usage: python bench/engine.py [--model builtin://small] [--batch 8] [--seq 128] [--steps 10] [--threads 1]
       python bench/engine.py --packing-only [--pack-batch 16] [--min-len 40] [--max-len 200]
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
    ap.add_argument("--packing-only", action="store_true", help="only section 3 (packed vs padded)")
    ap.add_argument("--pack-batch", type=int, default=16, help="datums per packing batch")
    ap.add_argument("--min-len", type=int, default=40)
    ap.add_argument("--max-len", type=int, default=200)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.packing_only:
        _packing(args)
        return

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
    print()
    _packing(args, ours)


def _varied(n: int, lo: int, hi: int, vocab: int, seed: int, group: int = 0) -> list[Datum]:
    """``n`` datums of ``lo``..``hi`` tokens; with ``group``, GRPO-like: groups of ``group`` datums share a
    prompt of ``lo`` tokens (each datum = that prompt + its own completion)."""
    rng = np.random.default_rng(seed)
    out = []
    prompt = rng.integers(0, vocab, size=lo)
    for i in range(n):
        k = int(rng.integers(lo, hi + 1))
        r = rng.integers(0, vocab, size=k + 1)
        if group:
            if i % group == 0:
                prompt = rng.integers(0, vocab, size=lo)
            r[:lo] = prompt
        out.append(Datum(model_input=ModelInput.from_ints(r[:-1].tolist()), loss_fn_inputs={
            "target_tokens": r[1:], "logprobs": np.full(k, -5.0, np.float32),
            "advantages": rng.normal(size=k).astype(np.float32)}))
    return out


def _packing(args: argparse.Namespace, ours: TransformersBackend | None = None) -> None:
    """Section 3: packed vs padded training steps on batches of varied lengths (importance_sampling, as GRPO)."""
    from twinkle.model.transformers._pack import pack, padding_fraction, share_prefixes

    if ours is None:
        ours = TransformersBackend(args.model, device=args.device)
    names = ["p0", "p1", "p2", "p3"]
    for i, n in enumerate(names):
        ours.add_adapter(n, LoraConfig(rank=args.rank, target_modules=TARGETS, seed=i))
    plain = [_varied(args.pack_batch, args.min_len, args.max_len, ours.vocab_size, seed=100 + i)
             for i in range(args.steps + 2)]
    grpo = [_varied(args.pack_batch, args.min_len, args.max_len, ours.vocab_size, seed=200 + i, group=8)
            for i in range(args.steps + 2)]
    print(f"packing: {args.pack_batch} datums of {args.min_len}-{args.max_len} tokens per batch (GRPO groups: "
          f"8 datums share a {args.min_len}-token prompt), importance_sampling loss, best of {args.steps} "
          "interleaved steps")
    print(f"{'case':<34}{'padding':>9}{'tokens/s':>11}{'packed/padded':>15}")
    for label, split, batches in (("1 adapter", 1, plain), ("4 adapters, one mixed batch", 4, plain),
                                  ("GRPO groups of 8, 1 adapter", 1, grpo)):
        def items(data: list[Datum], split: int = split) -> list[BatchItem]:
            per = len(data) // split
            return [BatchItem(names[k], data[k * per:(k + 1) * per], loss_fn="importance_sampling")
                    for k in range(split)]

        def step(data: list[Datum], packing: bool, split: int = split) -> None:
            ours.packing = packing
            ours.run_batch(items(data))
            for n in names[:split]:
                ours.optim_step(n)

        rate: dict[bool, list[float]] = {True: [], False: []}  # real tokens/s of each step
        pad: dict[bool, list[float]] = {True: [], False: []}
        for i, data in enumerate(batches):
            lengths = [d.model_input.length for d in data]
            toks = [np.asarray(d.model_input.to_ints()) for d in data]
            segs = [(k * (len(data) // split), (k + 1) * (len(data) // split), names[k]) for k in range(split)]
            shared = share_prefixes(toks, segs)
            if shared is not None:  # slots computed per datum token: below 1 when prompts are shared
                pad[True].append(padding_fraction(lengths, shared.rows, shared.ids.shape[1]))
            else:
                lay = pack(toks, segs)
                pad[True].append(padding_fraction(lengths, lay.rows, max(lengths)))
            pad[False].append(padding_fraction(lengths, len(lengths), max(lengths)))
            order = (True, False) if i % 2 == 0 else (False, True)
            for packing in order:
                t = _timed(lambda d=data, p=packing: step(d, p))
                if i >= 2:
                    rate[packing].append(sum(lengths) / t)
        best = {k: max(v) for k, v in rate.items()}
        for packing in (False, True):
            name = f"{label}, {'packed' if packing else 'padded'}"
            ratio = f"{best[True] / best[False]:.2f}x" if packing else ""
            print(f"{name:<34}{np.mean(pad[packing]) * 100:>8.1f}%{best[packing]:>11.0f}{ratio:>15}")
    ours.packing = True
    print("padding = share of computed token slots holding no datum token (mean over batches; negative: shared "
          "prompts are computed once for several datums); tokens/s counts datum tokens (best step)")


if __name__ == "__main__":
    main()
