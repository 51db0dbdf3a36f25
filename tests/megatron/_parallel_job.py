"""One training scenario on a megatron backend of a given TP/DP size, writing what it saw to ``out/result.json``.

Run as ``python _parallel_job.py MODEL_DIR OUT_DIR TP DP`` (rank 0 in this process, the other ranks spawned over
gloo by the backend itself), or call :func:`run` in-process for the TP=1/DP=1 reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def batch(seed: int, n: int = 3, length: int = 12, vocab: int = 301) -> list:
    from twinkle.types import datum_from_tokens

    rng = np.random.default_rng(seed)
    return [datum_from_tokens(rng.integers(0, vocab, length).tolist()) for _ in range(n)]


def run(model: str, out: Path, tp: int, dp: int, steps: int = 4) -> dict:
    from twinkle.model.base import BatchItem, SampleItem
    from twinkle.model.megatron import MegatronBackend
    from twinkle.types import AdamParams, LoraConfig, SamplingParams, TwinkleError

    b = MegatronBackend(model, tensor_parallel_size=tp, data_parallel_size=dp, launcher="process")
    res: dict = {"num_parameters": b.model_info().num_parameters}
    prompt = np.random.default_rng(1).integers(0, 301, 20).tolist()
    s = b.sample([SampleItem(None, prompt, 1, SamplingParams(max_tokens=1, temperature=0.0), prompt_logprobs=True)])
    res["prompt_logprobs"] = s[0].prompt_logprobs[1:]
    b.add_adapter("a", LoraConfig(rank=4, seed=7))
    losses, norms = [], []
    for step in range(steps):
        o = b.run_batch([BatchItem("a", batch(step))])
        losses.append(o[0].metrics["loss:sum"])
        m = b.optim_step("a", AdamParams(learning_rate=5e-3, eps=1e-8, grad_clip_norm=1.0))
        norms.append(m["grad_norm:mean"])
    res["losses"], res["grad_norms"] = losses, norms
    res["bad_input"] = []  # typed errors raised on every rank alike; the ranks stay in step (later results)
    for call in (lambda: b.run_batch([BatchItem("nope", batch(0))]), lambda: b.load("x", out / "missing"),
                 lambda: b.add_adapter("a", LoraConfig(rank=4))):
        try:
            call()
        except TwinkleError as e:
            res["bad_input"].append([type(e).__name__, e.field])
    b.save("a", out / "ck", optimizer=True)
    held = batch(99)
    fwd = b.run_batch([BatchItem("a", held, forward_only=True)])[0]
    res["held_logprobs"] = [x["logprobs"].to_numpy().tolist() for x in fwd.loss_fn_outputs]
    b.load("re", out / "ck", optimizer=True)  # every rank reads and keeps its slice
    fwd = b.run_batch([BatchItem("re", held, forward_only=True)])[0]
    res["reloaded_logprobs"] = [x["logprobs"].to_numpy().tolist() for x in fwd.loss_fn_outputs]
    for name in ("a", "re"):  # one more identical step on both: the optimizer state was restored too
        b.run_batch([BatchItem(name, batch(7))])
        b.optim_step(name, AdamParams(learning_rate=5e-3, eps=1e-8))
    res["after_step"] = [b.run_batch([BatchItem(n, held, forward_only=True)])[0].metrics["loss:sum"] for n in ("a", "re")]
    mixed = b.run_batch([BatchItem("a", held[:2], forward_only=True), BatchItem("re", batch(5), forward_only=True)])
    res["mixed"] = [o.metrics["loss:sum"] for o in mixed]  # rows of two adapters in one pass (split over DP ranks)
    b.run_batch([BatchItem("a", batch(8, n=1))])  # one row: at DP 2 the second rank has none
    b.optim_step("a", AdamParams(learning_rate=5e-3, eps=1e-8))
    res["after_one_row"] = b.run_batch([BatchItem("a", held, forward_only=True)])[0].metrics["loss:sum"]
    g = b.sample([SampleItem("a", [5, 6, 7], 1, SamplingParams(max_tokens=5, temperature=0.0))])
    res["greedy"] = g[0].sequences[0].tokens
    # left-padded rows of two lengths, with and without an adapter, through the KV cache (on by default; every
    # TP rank caches its own heads); at TP 1 also without the cache
    batch_items = [SampleItem("a", [5, 6, 7, 8, 9], 1, SamplingParams(max_tokens=6, temperature=0.0, stop=[])),
                   SampleItem(None, [10, 11], 1, SamplingParams(max_tokens=6, temperature=0.0, stop=[])),
                   SampleItem("re", [12, 13, 14], 1, SamplingParams(max_tokens=6, temperature=0.8, seed=3, stop=[]))]

    def flat(responses) -> list:
        return [[s.tokens, s.logprobs] for r in responses for s in r.sequences]

    res["cached_batch"] = flat(b.sample(batch_items))
    res["kv_cache"] = b.kv_cache  # still on: the cache served every step (no fallback)
    if b.world == 1:
        b.kv_cache = False
        res["uncached_batch"] = flat(b.sample(batch_items))
        b.kv_cache = True
    b.close()
    (out / "result.json").write_text(json.dumps(res))
    return res


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    run(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
