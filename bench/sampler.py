"""Sampling throughput and time-to-first-token, measured side by side in one run.

Systems, on the same model, prompts (24-38 random tokens) and settings (temperature 1, no stop, exactly
``--max-tokens`` new tokens per sequence, ``--threads`` torch threads on each side):

* **HF generate**: ``AutoModelForCausalLM.generate`` in this process, the same prompts in one left-padded
  batch (``num_return_sequences`` for ``num_samples``): the best a user gets sampling locally.
* **native**: ``twinkle_client.Sampler(model)`` from a live rank-8 adapter through a local server, the
  requests fired concurrently (``sample_async``) and awaited.
* **tinker**: the unmodified Tinker SDK's ``SamplingClient`` from the same adapter saved for sampling.

Rows: 1, 8 and 32 concurrent requests with ``num_samples`` 1, and 1 and 8 requests with ``num_samples`` 8; and
4 prompts x 8 sent as 32 requests of one sample each (a GRPO group the way the Tinker cookbook's completer samples
it; HF ``generate`` gets the 4 prompts with ``num_return_sequences`` 8, what a local user would write); and 8
conversations of 4 turns (each turn's prompt is the last one + its completion + 16 new tokens, as multi-turn RL
sends them; HF ``generate`` is called once a turn on the 8 prompts, prefilling each conversation again).
Rounds alternate which system goes first; the medians are compared (ratios vs HF generate).
TTFT: the latency of a 1-token request (p50/p99 of ``--ttft-n`` requests), idle and while another tenant
(its own API key and adapter) trains forward_backward + optim_step in a loop; the default server samples on a
thread of its own beside training. ``--ttft-baseline`` measures it again on two more servers: one thread with
training interleaved in slices (``concurrent_sampling: false``), and one thread never splitting training
(``train_slice_s: 0`` too); ``--ttft-only`` skips the throughput rows.

    .venv/bin/python bench/sampler.py [--model builtin://small] [--max-tokens 64] [--rounds 2] [--threads 1]
    .venv/bin/python bench/sampler.py --sample-dtype bfloat16   # the server samples with bfloat16 weights
    .venv/bin/python bench/sampler.py --ttft-only --ttft-baseline
    .venv/bin/python bench/sampler.py --ttft-compare training_nice=0 [--ttft-rounds 3] [--ttft-n 30]

``--ttft-compare KEY=VALUE[;KEY=VALUE...]`` measures TTFT on two servers that are up at the same time, the
default one and one with those ``scheduler:`` settings, alternating chunks of requests between them (idle, then
under training, each round) so that both see the same machine load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TINKER_TELEMETRY", "0")
ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path.pop(0)  # bench/tinker.py must not shadow the SDK
sys.path.insert(0, str(ROOT))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(24, 39))] for _ in range(n)]


class HF:
    def __init__(self, path: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def _generate(self, prompts: list[list[int]], n: int, max_tokens: int) -> list[list[int]]:
        """The completions (``n`` a prompt, in order) of the prompts in one left-padded batch."""
        torch = self.torch
        w = max(map(len, prompts))
        ids = torch.tensor([[0] * (w - len(p)) + p for p in prompts])
        mask = (torch.arange(w)[None] >= torch.tensor([w - len(p) for p in prompts])[:, None]).long()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                      min_new_tokens=max_tokens, do_sample=True, temperature=1.0, top_k=0,
                                      top_p=1.0, num_return_sequences=n, pad_token_id=0)
        return [row.tolist() for row in out[:, w:]]

    def run(self, prompts: list[list[int]], n: int, max_tokens: int) -> int:
        return sum(map(len, self._generate(prompts, n, max_tokens)))

    def turns(self, prompts: list[list[int]], turns: int, max_tokens: int) -> int:
        return _turns(lambda ps: self._generate(ps, 1, max_tokens), prompts, turns)


_NEXT_TURN = [3 + (7 * j) % 50 for j in range(16)]  # the tokens a multi-turn case adds after each completion


def _turns(run: Any, prompts: list[list[int]], turns: int) -> int:
    """``turns`` rounds of ``run(prompts) -> completions``, each prompt growing by its completion + new tokens."""
    total = 0
    for _ in range(turns):
        outs = run(prompts)
        total += sum(map(len, outs))
        prompts = [p + o + _NEXT_TURN for p, o in zip(prompts, outs, strict=True)]
    return total


def _native_turns(sampler: Any, prompts: list[list[int]], turns: int, max_tokens: int) -> int:
    from twinkle.types import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=1.0, stop=[])
    return _turns(lambda ps: [f.result().sequences[0].tokens for f in [sampler.sample_async(p, sp) for p in ps]],
                  prompts, turns)


def _tinker_turns(sc: Any, prompts: list[list[int]], turns: int, max_tokens: int) -> int:
    from tinker import types as tt

    sp = tt.SamplingParams(max_tokens=max_tokens, temperature=1.0, stop=[])
    return _turns(lambda ps: [f.result().sequences[0].tokens for f in [
        sc.sample(prompt=tt.ModelInput.from_ints(p), num_samples=1, sampling_params=sp) for p in ps]], prompts, turns)


def _native_run(sampler: Any, prompts: list[list[int]], n: int, max_tokens: int) -> int:
    from twinkle.types import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=1.0, stop=[])
    futs = [sampler.sample_async(p, sp, num_samples=n) for p in prompts]
    return sum(len(s.tokens) for f in futs for s in f.result().sequences)


def _tinker_run(sc: Any, prompts: list[list[int]], n: int, max_tokens: int) -> int:
    from tinker import types as tt

    sp = tt.SamplingParams(max_tokens=max_tokens, temperature=1.0, stop=[])
    futs = [sc.sample(prompt=tt.ModelInput.from_ints(p), num_samples=n, sampling_params=sp) for p in prompts]
    return sum(len(s.tokens) for f in futs for s in f.result().sequences)


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    toks = fn()
    return toks / (time.perf_counter() - t)


def _trainer(url: str, key: str, model_id: str, stop: threading.Event, rows: int, seq: int,
             steps: list[float] | None = None) -> threading.Thread:
    """Another tenant training in a loop until ``stop``; ``steps`` gets the time each optim_step returned."""
    import numpy as np

    import twinkle_client
    from twinkle_client.model import TransformersModel

    def loop() -> None:
        sess = twinkle_client.connect(url, key)
        model = TransformersModel(model_id, session=sess)
        model.add_adapter_to_model("other-tenant", r=8)
        rng = np.random.default_rng(1)
        inputs = [{"input_ids": rng.integers(3, 1000, size=seq).tolist()} for _ in range(rows)]
        try:
            while not stop.is_set():
                model.forward_backward(inputs=inputs)
                model.clip_grad_and_step()
                if steps is not None:
                    steps.append(time.perf_counter())
        finally:  # frees the adapter slot: --ttft-compare starts a trainer per round
            sess.close()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def _ttft(sampler: Any, prompts: list[list[int]], n: int) -> list[float]:
    from twinkle.types import SamplingParams

    sp = SamplingParams(max_tokens=1, temperature=1.0, stop=[])
    out = []
    for i in range(n):
        t = time.perf_counter()
        sampler.sample(prompts[i % len(prompts)], sp)
        out.append(time.perf_counter() - t)
        time.sleep(0.02)
    return out


def _server(model: str, threads: int, scheduler: dict[str, Any] | None = None, sample_dtype: str = "float32") -> Any:
    """A local server; ``scheduler``: settings for the model's ``scheduler:`` section."""
    from twinkle.local_server import LocalServer

    class _Server(LocalServer):
        def config(self) -> dict[str, Any]:
            cfg = super().config()
            if scheduler:
                cfg["models"][0]["scheduler"] = dict(scheduler)
            cfg["models"][0]["sample_dtype"] = sample_dtype
            return cfg

    return _Server(model, threads=threads)


def _ttft_pair(server: Any, native: Any, args: Any, vocab: int) -> tuple[list[float], list[float]]:
    """TTFT idle, then while another tenant trains (on ``server``, sampling through ``native``)."""
    ttft_prompts = _prompts(8, vocab, 7)
    _ttft(native, ttft_prompts, 4)  # warm-up, not counted: the first sample packs the weights (~0.3-0.6 s)
    idle = _ttft(native, ttft_prompts, args.ttft_n)
    stop = threading.Event()
    trainer_key = server.create_key(user="trainer")
    steps: list[float] = []
    th = _trainer(server.url, trainer_key, args.model, stop, args.train_rows, args.train_seq, steps)
    time.sleep(3.0)
    t0 = time.perf_counter()
    busy = _ttft(native, ttft_prompts, args.ttft_n)
    t1 = time.perf_counter()
    done = sum(t0 <= t <= t1 for t in steps)
    print(f"the other tenant trained {done} steps ({done / (t1 - t0):.1f}/s) while {args.ttft_n} TTFT requests ran "
          f"({t1 - t0:.1f} s)")
    if not done:
        raise SystemExit("the training load did not run during the measurement")
    stop.set()
    th.join(timeout=60)
    return idle, busy


# --ttft-baseline: the same measurement on servers with the earlier ways of sharing the device
_BASELINES: list[tuple[str, dict[str, Any]]] = [
    ("one thread, training interleaved (concurrent_sampling: false)", {"concurrent_sampling": False}),
    ("one thread, never split (train_slice_s: 0)", {"concurrent_sampling": False, "train_slice_s": 0}),
]


def _parse_settings(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in (p for p in text.split(";") if p.strip()):
        k, _, v = part.partition("=")
        out[k.strip()] = yaml_value(v.strip())
    return out


def yaml_value(v: str) -> Any:
    import yaml

    return yaml.safe_load(v)


def ttft_compare(args: Any, vocab: int) -> None:
    """Two servers up together (default, and one with the ``--ttft-compare`` settings), TTFT measured in
    alternating chunks: each round, per server, ``--ttft-n / --ttft-rounds`` idle requests, then as many while
    another tenant trains on that server."""
    import contextlib

    import twinkle_client
    from twinkle_client.model import TransformersModel
    from twinkle_client.sampler import Sampler

    sched = _parse_settings(args.ttft_compare)
    variants: list[tuple[str, Any]] = [
        ("default", _server(args.model, args.threads)),
        (", ".join(f"{k}: {v}" for k, v in sched.items()), _server(args.model, args.threads, sched))]
    per = max(1, args.ttft_n // args.ttft_rounds)
    prompts = _prompts(8, vocab, 7)
    res: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name, _ in variants}
    with contextlib.ExitStack() as stack:
        live = []
        for name, srv in variants:
            server = stack.enter_context(srv)
            sess = twinkle_client.connect(server.url, server.api_key)
            m = TransformersModel(args.model, session=sess)
            m.add_adapter_to_model("bench-sampler", r=8)
            native = Sampler(m)
            _native_run(native, _prompts(2, vocab, 99), 1, 4)
            live.append((name, server, native, server.create_key(user="trainer")))
        for rnd in range(args.ttft_rounds):
            order = live if rnd % 2 == 0 else list(reversed(live))
            for name, server, native, tkey in order:
                res[name][0].extend(_ttft(native, prompts, per))
                stop = threading.Event()
                th = _trainer(server.url, tkey, args.model, stop, args.train_rows, args.train_seq)
                time.sleep(3.0)
                res[name][1].extend(_ttft(native, prompts, per))
                stop.set()
                th.join(timeout=120)
                print(f"round {rnd} {name}: idle p99 {_pct(res[name][0], 0.99) * 1e3:.0f} ms, training p99 "
                      f"{_pct(res[name][1], 0.99) * 1e3:.0f} ms (load average {os.getloadavg()[0]:.1f})", flush=True)
    print(f"\nTTFT side by side (1-token request, native client), {per * args.ttft_rounds} requests per cell, "
          f"{args.ttft_rounds} alternating rounds; training load: another tenant's forward_backward + optim_step on "
          f"{args.train_rows} x {args.train_seq} tokens in a loop")
    print("| | p50 ms | p90 ms | p99 ms | p99 training / idle |")
    print("|---|---|---|---|---|")
    for name, (idle, busy) in res.items():
        print(f"| {name}: idle | {_pct(idle, 0.5) * 1e3:.0f} | {_pct(idle, 0.9) * 1e3:.0f} | "
              f"{_pct(idle, 0.99) * 1e3:.0f} | |")
        print(f"| {name}: while another tenant trains | {_pct(busy, 0.5) * 1e3:.0f} | {_pct(busy, 0.9) * 1e3:.0f} | "
              f"{_pct(busy, 0.99) * 1e3:.0f} | {_pct(busy, 0.99) / _pct(idle, 0.99):.2f}x |")


def _ttft_rows(label: str, idle: list[float], busy: list[float]) -> None:
    print(f"| {label}: idle | {_pct(idle, 0.5) * 1e3:.0f} | {_pct(idle, 0.99) * 1e3:.0f} | |")
    print(f"| {label}: while another tenant trains | {_pct(busy, 0.5) * 1e3:.0f} | {_pct(busy, 0.99) * 1e3:.0f} "
          f"| {_pct(busy, 0.99) / _pct(idle, 0.99):.2f}x |")


def _throughput_table(args: Any, cases: list[tuple[int, int, str]], results: dict[Any, dict[str, list[float]]]) -> None:
    print(f"Sampling throughput, {args.model} (server sample_dtype {args.sample_dtype}, HF generate float32), "
          f"rank-8 adapter, {args.max_tokens} new tokens per sequence, "
          f"{args.threads} torch thread(s) each side, median of {args.rounds} rounds (tokens/s); ratios: median "
          f"(min-max) of each round's ratio, both sides measured back to back (load average now "
          f"{os.getloadavg()[0]:.1f})")
    print("| requests x num_samples | HF generate | native | tinker SDK | native / HF | tinker / HF |")
    print("|---|---|---|---|---|---|")
    for c, n, kind in cases:
        res = results[(c, n, kind)]
        r = {k: statistics.median(v) for k, v in res.items()}

        def ratio(side: str, res: dict[str, list[float]] = res) -> str:
            per_round = [x / h for x, h in zip(res[side], res["hf"], strict=True)]
            return f"{statistics.median(per_round):.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"

        label = {"split": f"{c} x {n} as {c * n} requests", "turns": f"{c} x 1, {n} turns"}.get(kind, f"{c} x {n}")
        print(f"| {label} | {r['hf']:.0f} | {r['native']:.0f} | {r['tinker']:.0f} | "
              f"{ratio('native')} | {ratio('tinker')} |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin://small")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--ttft-n", type=int, default=30)
    ap.add_argument("--train-rows", type=int, default=4)
    ap.add_argument("--train-seq", type=int, default=64)
    ap.add_argument("--ttft-only", action="store_true", help="skip the throughput rows")
    ap.add_argument("--ttft-baseline", action="store_true",
                    help="also measure TTFT on a server that never splits training for sampling")
    ap.add_argument("--ttft-compare", default=None, help="scheduler settings KEY=VALUE;...: TTFT side by side "
                    "against the default server (see the module docstring)")
    ap.add_argument("--ttft-rounds", type=int, default=3)
    ap.add_argument("--sample-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the server model's sample_dtype (bfloat16: faster, logprobs ~1e-2 off; docs/server.md)")
    args = ap.parse_args()

    import tinker
    import torch

    import twinkle_client
    from twinkle.model.hub import resolve_model
    from twinkle_client.model import TransformersModel
    from twinkle_client.sampler import Sampler

    torch.set_num_threads(args.threads)
    hf = HF(str(resolve_model(args.model)))
    vocab = int(hf.model.config.vocab_size)
    if args.ttft_compare is not None:
        ttft_compare(args, vocab)
        return
    levels = [int(x) for x in args.levels.split(",")]
    cases = [] if args.ttft_only else [(c, 1, "") for c in levels] + [(1, 8, ""), (8, 8, ""), (4, 8, "split"),
                                                                         (8, 4, "turns")]
    mt = args.max_tokens

    with _server(args.model, args.threads, sample_dtype=args.sample_dtype) as server:
        twinkle_client.init_twinkle_client(server.url, api_key=server.api_key)
        model = TransformersModel(args.model)
        model.add_adapter_to_model("bench-sampler", r=8)
        native = Sampler(model)
        svc = tinker.ServiceClient(base_url=server.url, api_key=server.api_key)
        tc = svc.create_lora_training_client(base_model=args.model, rank=8).result()
        tsc = tc.save_weights_and_get_sampling_client("bench-sampler")
        warm = _prompts(2, vocab, 99)
        _native_run(native, warm, 1, 4)
        _tinker_run(tsc, warm, 1, 4)
        hf.run(warm, 1, 4)

        results: dict[tuple[int, int, str], dict[str, list[float]]] = {
            c: {"hf": [], "native": [], "tinker": []} for c in cases}
        for rnd in range(args.rounds):
            for c, n, kind in cases:
                prompts = _prompts(c, vocab, 1000 * rnd + c + n + 7 * len(kind))
                # split: each prompt sent as n requests of one sample
                sent, k = ([q for q in prompts for _ in range(n)], 1) if kind == "split" else (prompts, n)
                runs = {"hf": lambda p=prompts, n=n: hf.run(p, n, mt),
                        "native": lambda p=sent, k=k: _native_run(native, p, k, mt),
                        "tinker": lambda p=sent, k=k: _tinker_run(tsc, p, k, mt)}
                if kind == "turns":
                    runs = {"hf": lambda p=prompts, n=n: hf.turns(p, n, mt),
                            "native": lambda p=prompts, n=n: _native_turns(native, p, n, mt),
                            "tinker": lambda p=prompts, n=n: _tinker_turns(tsc, p, n, mt)}
                names = list(runs) if rnd % 2 == 0 else list(reversed(runs))
                res = results[(c, n, kind)]
                for name in names:
                    res[name].append(_timed(runs[name]))
                print(f"round {rnd} {c}x{n} {kind}: "
                      + ", ".join(f"{k} {v[-1]:.0f}" for k, v in res.items()), flush=True)

        idle, busy = _ttft_pair(server, native, args, vocab)

    bases: list[tuple[str, tuple[list[float], list[float]]]] = []
    for label, sched in (_BASELINES if args.ttft_baseline else []):
        with _server(args.model, args.threads, sched) as server:
            sess = twinkle_client.connect(server.url, server.api_key)
            bmodel = TransformersModel(args.model, session=sess)
            bmodel.add_adapter_to_model("bench-sampler", r=8)
            bnative = Sampler(bmodel)
            _native_run(bnative, _prompts(2, vocab, 99), 1, 4)
            bases.append((label, _ttft_pair(server, bnative, args, vocab)))

    print()
    if cases:
        _throughput_table(args, cases, results)
    print()
    print(f"TTFT (1-token request, native client), {args.ttft_n} requests; training load: another tenant's "
          f"forward_backward + optim_step on {args.train_rows} x {args.train_seq} tokens in a loop")
    print("| | p50 ms | p99 ms | p99 training / idle |")
    print("|---|---|---|---|")
    _ttft_rows("concurrent sampling thread (default)", idle, busy)
    for label, pair in bases:
        _ttft_rows(label, *pair)


if __name__ == "__main__":
    main()
