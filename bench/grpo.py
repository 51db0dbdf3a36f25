"""End-to-end GRPO (cookbook ``short_math_grpo``, native client and Tinker SDK) before vs after, one run.

"before": the server code at ``--before`` (a git revision, default: the merge base with ``main``), exported
with ``git archive`` into a temporary directory; "after": this checkout. Both servers run at once
(``twinkle.local_server.LocalServer``, same model and threads, each launched with its own code on
``PYTHONPATH``) and the recipes run as child processes with the same flags in alternating rounds (round 1
before then after, round 2 after then before, ...), so load that changes during the run hits both sides
alike; the recipes' own ``seconds`` (from their ``RESULT`` line) are compared, median over rounds.

    .venv/bin/python bench/grpo.py [--before REV] [--rounds 2] [--flags "--warmup_steps=20 --rl_steps=5"]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"native": "cookbook/client/twinkle/self_host/short_math_grpo.py",
           "tinker": "cookbook/client/tinker/self_host/short_math_grpo.py"}


_PHASES = ("setup", "warmup", "greedy", "sample", "train")


def _export(rev: str, dest: Path) -> Path:
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=arch, check=True)
    return dest


@contextlib.contextmanager
def _pythonpath(code: Path) -> Iterator[None]:
    """Launch with ``code`` first on the path; also the working directory (``python -m`` puts the working
    directory before ``PYTHONPATH``, and Ray's workers inherit it)."""
    old, cwd = os.environ.get("PYTHONPATH"), os.getcwd()
    os.environ["PYTHONPATH"] = str(code)
    os.chdir(code)
    try:
        yield
    finally:
        os.chdir(cwd)
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _recipe(name: str, server: object, code: Path, model: str, flags: list[str]) -> dict:
    """This checkout's recipe (the recipes are unchanged since 5e18156 but for the ``phases`` timing), run with
    ``code`` on the path: each side's own client libraries (``twinkle_client``, ``twinkle.data``)."""
    env = dict(os.environ, TWINKLE_SERVER_URL=server.url, TWINKLE_API_KEY=server.api_key,  # type: ignore[attr-defined]
               TWINKLE_BASE_MODEL=model, TINKER_TELEMETRY="0", PYTHONPATH=str(code))
    proc = subprocess.run([sys.executable, str(ROOT / RECIPES[name]), *flags], env=env, capture_output=True,
                          text=True, timeout=3600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default=None, help="git revision of the 'before' server (default: merge-base main)")
    ap.add_argument("--model", default="builtin://tiny")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", default="native,tinker", help="comma-separated: native, tinker")
    ap.add_argument("--flags", default="--warmup_steps=20 --rl_steps=5")
    args = ap.parse_args()
    rev = args.before or subprocess.run(["git", "-C", str(ROOT), "merge-base", "HEAD", "main"], check=True,
                                        capture_output=True, text=True).stdout.strip()
    flags = args.flags.split()
    clients = [c for c in args.clients.split(",") if c]
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    from twinkle.local_server import LocalServer

    times: dict[str, dict[str, list[float]]] = {side: {c: [] for c in clients} for side in ("before", "after")}
    phases: dict[str, dict[str, list[dict[str, float]]]] = {s: {c: [] for c in clients} for s in ("before", "after")}
    with tempfile.TemporaryDirectory(prefix="twinkle-before-") as tmp, contextlib.ExitStack() as stack:
        before_dir = _export(rev, Path(tmp))
        print(f"before = {rev[:10]} ({before_dir}), after = this checkout; recipe flags: {args.flags}", flush=True)
        servers, codes = {}, {"before": before_dir, "after": ROOT}
        for side, code in codes.items():
            with _pythonpath(code):
                servers[side] = stack.enter_context(LocalServer(args.model, threads=args.threads))
        for r in range(args.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for side in order:
                for c in clients:
                    res = _recipe(c, servers[side], codes[side], args.model, flags)
                    times[side][c].append(float(res["seconds"]))
                    phases[side][c].append(res.get("phases") or {})
                    ph = " ".join(f"{k} {v:.1f}" for k, v in (res.get("phases") or {}).items())
                    print(f"  round {r + 1} {side:<6} {c:<6} {res['seconds']:6.1f}s acc {res.get('accuracy_after')} "
                          f"({ph})", flush=True)
    print()
    print(f"GRPO end to end (cookbook short_math_grpo, {args.model}, {args.flags}), seconds, median of "
          f"{args.rounds} alternating rounds (each round's figures in brackets)")
    print("| client | before | after | speed-up |")
    print("|---|---|---|---|")
    for c in clients:
        b, a = times["before"][c], times["after"][c]
        print(f"| {c} | {statistics.median(b):.1f} ({', '.join(f'{x:.1f}' for x in b)}) | {statistics.median(a):.1f} "
              f"({', '.join(f'{x:.1f}' for x in a)}) | {statistics.median(b) / statistics.median(a):.2f}x |")
    print()
    print("where the time goes (median seconds per phase: setup = client, adapter and tokenizer; warmup = SFT; greedy ="
          " the two accuracy passes; sample / train = the GRPO steps' sampling and forward_backward + optim_step"
          " (+ save for the Tinker sampler))")
    print("| client | side | " + " | ".join(_PHASES) + " |")
    print("|---|---|" + "---|" * len(_PHASES))
    for c in clients:
        for side in ("before", "after"):
            cells = [statistics.median([p.get(k, 0.0) for p in phases[side][c]] or [0.0]) for k in _PHASES]
            print(f"| {c} | {side} | " + " | ".join(f"{x:.1f}" for x in cells) + " |")


if __name__ == "__main__":
    main()
