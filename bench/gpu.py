"""One prepared GPU check: training MFU of a ~0.5B Qwen3 and sampler tokens/s vs HF ``generate``.

On a CUDA machine (default): a random-init Qwen3 config of ~0.5B parameters (hidden 1024, 24 layers, 16 heads,
8 KV heads, FFN 3072, vocab 151936) in bf16, built offline;

1. training: ``TransformersBackend.run_batch`` + ``optim_step`` with a rank-16 LoRA on all linear layers over
   8 x 2048 tokens; prints tokens/s and MFU (model FLOPs 6 * N * tokens per step over the device's dense bf16
   peak; LoRA skips the weight gradients, so 4 * N * tokens of it is the work actually needed: both shown);
2. sampling: 32 prompts x 128 new tokens, the continuous sampler (``backend.sample``) vs HF ``generate`` on
   the same model, prompts and sampling settings, side by side.

``--smoke``: the same code on a tiny config on CPU in seconds (CI runs it so the script cannot rot).

    python bench/gpu.py [--smoke] [--steps 5] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8, head_dim=64,
            intermediate_size=3072, vocab_size=151936, max_position_embeddings=4096)
SMOKE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             intermediate_size=64, vocab_size=512, max_position_embeddings=512)


def _build(path: Path, cfg: dict, dtype: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from twinkle.model.transformers._random import tiny_model_path

    path.mkdir(parents=True, exist_ok=True)
    for f in tiny_model_path().iterdir():  # a tokenizer (ids beyond its vocabulary are never decoded here)
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            (path / f.name).write_bytes(f.read_bytes())
    conf = Qwen3Config(**cfg, tie_word_embeddings=True, eos_token_id=2, pad_token_id=0, bos_token_id=None)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(conf, dtype=getattr(torch, dtype))
    model.save_pretrained(str(path))
    return path


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU (CI)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device (H100/H200)")
    args = ap.parse_args()

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from twinkle.model.base import BatchItem, SampleItem
    from twinkle.model.transformers import TransformersBackend
    from twinkle.types import Datum, LoraConfig, ModelInput, SamplingParams

    cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        args.steps, args.batch, args.seq, args.prompts, args.new_tokens = 1, 2, 16, 4, 4
        torch.set_num_threads(1)
    dtype = "bfloat16" if cuda else "float32"
    out: dict[str, object] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": dtype}
    with tempfile.TemporaryDirectory() as tmp:
        path = _build(Path(tmp) / "m", SMOKE if args.smoke else FULL, dtype)
        b = TransformersBackend(str(path), dtype=dtype, device="cuda" if cuda else "cpu")
        n_params = sum(p.numel() for n, p in b.model.named_parameters() if ".adapters." not in n)
        out["params"] = n_params
        b.add_adapter("a", LoraConfig(rank=16, seed=0))
        vocab = b.vocab_size
        rng = np.random.default_rng(0)
        rows = rng.integers(3, vocab, size=(args.batch, args.seq + 1))
        data = [Datum(model_input=ModelInput.from_ints(r[:-1].tolist()),
                      loss_fn_inputs={"target_tokens": r[1:], "weights": np.ones(args.seq, np.float32)}) for r in rows]
        times = []
        for i in range(args.steps + (0 if args.smoke else 1)):  # one warm-up step on GPU
            _sync()
            t = time.perf_counter()
            b.run_batch([BatchItem("a", data)])
            b.optim_step("a")
            _sync()
            if args.smoke or i > 0:
                times.append(time.perf_counter() - t)
        step = float(np.median(times))
        tokens = args.batch * args.seq
        out["train_tokens_per_s"] = tokens / step
        out["mfu_6NT"] = 6 * n_params * tokens / step / (args.peak_tflops * 1e12)
        out["mfu_4NT_lora"] = 4 * n_params * tokens / step / (args.peak_tflops * 1e12)
        if cuda:
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30

        rr = random.Random(1)
        prompts = [[rr.randrange(3, vocab) for _ in range(rr.randrange(24, 64))] for _ in range(args.prompts)]
        sp = SamplingParams(max_tokens=args.new_tokens, temperature=1.0, stop=[])
        b.sample([SampleItem("a", prompts[0], 1, SamplingParams(max_tokens=2, stop=[]))])  # warm-up
        _sync()
        t = time.perf_counter()
        res = b.sample([SampleItem("a", p, 1, sp) for p in prompts])
        _sync()
        ours = sum(len(s.tokens) for r in res for s in r.sequences) / (time.perf_counter() - t)
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).to(b.device).eval()
        w = max(map(len, prompts))
        ids = torch.tensor([[0] * (w - len(p)) + p for p in prompts], device=b.device)
        mask = (torch.arange(w, device=b.device)[None] >= torch.tensor([w - len(p) for p in prompts],
                                                                         device=b.device)[:, None]).long()
        with torch.no_grad():
            hf.generate(input_ids=ids[:1], attention_mask=mask[:1], max_new_tokens=2, do_sample=False, pad_token_id=0)
            _sync()
            t = time.perf_counter()
            g = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, do_sample=True, top_k=0, top_p=1.0, pad_token_id=0)
            _sync()
        hf_tps = (g.shape[1] - w) * g.shape[0] / (time.perf_counter() - t)
        out["sample_tokens_per_s"] = ours
        out["hf_generate_tokens_per_s"] = hf_tps
        out["sample_vs_generate"] = ours / hf_tps
        b.close()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
