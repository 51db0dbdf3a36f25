"""End-to-end GRPO (cookbook ``short_math_grpo``, native client and Tinker SDK) before vs after, one run.

"before": the server code at ``--before`` (a git revision, default: the merge base with ``main``), exported
with ``git archive`` into a temporary directory; "after": this checkout. Each side starts its own local
server (``twinkle.local_server.LocalServer``, same model and threads) and runs both recipes on it as child
processes with the same flags; the recipes' own ``seconds`` (from their ``RESULT`` line) are compared.

    .venv/bin/python bench/grpo.py [--before REV] [--flags "--warmup_steps=20 --rl_steps=5"] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"native": "cookbook/client/twinkle/self_host/short_math_grpo.py",
           "tinker": "cookbook/client/tinker/self_host/short_math_grpo.py"}


def _export(rev: str, dest: Path) -> Path:
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=arch, check=True)
    return dest


def _side(code: Path, model: str, threads: int, flags: list[str]) -> dict[str, float]:
    env_before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(code)
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    sys.path.insert(0, str(ROOT))
    from twinkle.local_server import LocalServer

    out: dict[str, float] = {}
    try:
        with LocalServer(model, threads=threads) as server:
            for name, script in RECIPES.items():
                env = dict(os.environ, TWINKLE_SERVER_URL=server.url, TWINKLE_API_KEY=server.api_key,
                           TWINKLE_BASE_MODEL=model, TINKER_TELEMETRY="0", PYTHONPATH=str(ROOT))
                proc = subprocess.run([sys.executable, str(ROOT / script), *flags], env=env, capture_output=True,
                                      text=True, timeout=3600)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
                res = json.loads(line[7:])
                out[name] = float(res["seconds"])
                print(f"  {code.name} {name}: {res['seconds']:.1f}s acc {res.get('accuracy_after')}", flush=True)
    finally:
        if env_before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env_before
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default=None, help="git revision of the 'before' server (default: merge-base main)")
    ap.add_argument("--model", default="builtin://tiny")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flags", default="--warmup_steps=20 --rl_steps=5")
    args = ap.parse_args()
    rev = args.before or subprocess.run(["git", "-C", str(ROOT), "merge-base", "HEAD", "main"], check=True,
                                        capture_output=True, text=True).stdout.strip()
    flags = args.flags.split()
    with tempfile.TemporaryDirectory(prefix="twinkle-before-") as tmp:
        before_dir = _export(rev, Path(tmp))
        print(f"before = {rev[:10]} ({before_dir}), after = this checkout; recipe flags: {args.flags}", flush=True)
        before = _side(before_dir, args.model, args.threads, flags)
        after = _side(ROOT, args.model, args.threads, flags)
    print()
    print(f"GRPO end to end (cookbook short_math_grpo, {args.model}, {args.flags}), seconds")
    print("| client | before | after | speed-up |")
    print("|---|---|---|---|")
    for name in RECIPES:
        print(f"| {name} | {before[name]:.1f} | {after[name]:.1f} | {before[name] / after[name]:.2f}x |")


if __name__ == "__main__":
    main()
