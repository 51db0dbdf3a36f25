"""Cold start of ``twinkle-server launch`` by phase: launch → first forward_backward result. Target ≤ 10 s.

Phases: the launcher's own report (Ray start, Serve start, deployments until healthy), then from healthy:
session + run creation and the first forward_backward result, on the mock model and (``--tiny``) on the
transformers ``builtin://tiny`` model. Each phase is shown with its share of the total and the load average,
since other work on the machine stretches every phase.

    .venv/bin/python bench/coldstart.py [--tiny] [--repeat 1] [--proxy haproxy,direct] [--placement auto,gateway]
    .venv/bin/python bench/coldstart.py --tiny --repeat 2 --before-tree /work/main   # main vs this tree, alternating
    .venv/bin/python bench/coldstart.py --models tiny --repeat 2   # the quickstart's shape: one model, builtin://tiny
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _serverproc as sp  # noqa: E402

API = "/api/v1/twinkle"
DATUM = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [5, 9, 17, 33]}]},
         "loss_fn_inputs": {"target_tokens": {"data": [9, 17, 33, 2], "dtype": "int64"}}}


def _wait(c: httpx.Client, ref: dict) -> dict:
    while True:
        body = c.get(f"{API}/futures/{ref['future_id']}", params={"timeout": 60}).json()
        if body["status"] == "complete":
            return body["result"]
        if body["status"] == "failed":
            raise RuntimeError(body["error"])


def _first_result(url: str, key: str, model: str) -> tuple[float, float]:
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=300) as c:
        t0 = time.monotonic()
        sid = c.post(f"{API}/sessions", json={}).json()["session_id"]
        run = _wait(c, c.post(f"{API}/runs", json={"session_id": sid, "base_model": model,
                                                   "lora": {"rank": 4}}).json())["run_id"]
        t1 = time.monotonic()
        _wait(c, c.post(f"{API}/runs/{run}/forward_backward", json={"data": [DATUM]}).json())
        return t1 - t0, time.monotonic() - t1


def _tree_cpu(pid: int) -> float:
    total = 0.0
    for p in sp.tree(pid):
        try:
            c = p.cpu_times()
            total += c.user + c.system
        except Exception:
            pass
    return total


_MODELS = {"mock": (sp.MOCK_MODEL, "mock"), "tiny": (sp.TINY_MODEL, "builtin://tiny")}


def once(names: list[str], proxy: str | None = None, placement: str = "auto",
         tree: str | None = None) -> list[tuple[str, float]]:
    work = Path(tempfile.mkdtemp(prefix="twinkle-cold-"))
    models = [{**_MODELS[n][0], "placement": placement} for n in names]
    cfg, url = sp.write_config(work, models, proxy=proxy)
    key = sp.create_key(cfg)
    log = work / "server.log"
    t0 = time.monotonic()
    proc = sp.launch(cfg, log, env={"PYTHONPATH": tree} if tree else None, cwd=tree)
    try:
        healthy = sp.wait_healthy(proc, url, log)
        cpu = _tree_cpu(proc.pid)  # CPU seconds spent starting: far less sensitive to other load than wall time
        phases: list[tuple[str, float]] = []
        deadline = time.monotonic() + 10
        m = None
        while m is None and time.monotonic() < deadline:
            m = re.search(r"started in ([\d.]+) s: ray ([\d.]+) s, serve ([\d.]+) s, deployments ([\d.]+) s",
                          log.read_text())
            time.sleep(0.1)
        if m:
            total, ray_s, serve_s, dep_s = (float(x) for x in m.groups())
            phases += [("python start + imports (launcher)", max(0.0, healthy - total)), ("ray.init", ray_s),
                       ("serve.start (controller + proxy)", serve_s), ("deployments until healthy", dep_s)]
        else:
            phases.append(("launch -> healthy", healthy))
        for n in names:
            create, fb = _first_result(url, key, _MODELS[n][1])
            phases += [(f"{n}: session + run", create), (f"{n}: first forward_backward", fb)]
        phases.append(("CPU s of the server's processes at healthy", cpu))
        phases.append(("TOTAL launch -> first result(s)", time.monotonic() - t0))
        return phases
    finally:
        took, left = sp.stop(proc, signal.SIGINT)
        print(f"(SIGINT -> exited in {took:.1f} s; left behind: {left or 'none'})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="also host and train builtin://tiny (transformers)")
    ap.add_argument("--models", default=None,
                    help="the models hosted, in order: a comma-separated list of mock, tiny (default: mock, and tiny "
                         "with --tiny); 'tiny' alone is the quickstart's shape")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--proxy", default="auto",
                    help="http.proxy: auto (default), direct, haproxy, serve, a comma-separated list of them, or both "
                         "(haproxy,serve); several: alternating runs, for comparison")
    ap.add_argument("--placement", default="auto",
                    help="models[].placement for every model: auto (default), gateway, replica, or a comma-separated "
                         "list (alternating runs with each --proxy)")
    ap.add_argument("--before-tree", default=None,
                    help="also run the server from this checkout (e.g. /work/main) with the same settings, "
                         "alternating with this tree")
    args = ap.parse_args()
    names = [n for n in (args.models or ("mock,tiny" if args.tiny else "mock")).split(",") if n]
    if not names or any(n not in _MODELS for n in names):
        raise SystemExit(f"--models: a comma-separated list of {', '.join(_MODELS)}")
    proxies = ["haproxy", "serve"] if args.proxy == "both" else [p for p in args.proxy.split(",") if p]
    placements = [p for p in args.placement.split(",") if p]
    totals: dict[str, list[tuple[float, float]]] = {}
    for i in range(args.repeat):
        for proxy in proxies:
            for placement in placements:
                for tree in ([args.before_tree, None] if args.before_tree else [None]):
                    name = f"proxy {proxy}, placement {placement}" + (f" from {tree}" if tree else "")
                    totals.setdefault(name, []).append(_report(i, proxy, placement, names, tree))
    if len(totals) > 1:
        print("\nTOTAL launch -> first result(s), per variant (runs alternated):")
        for name, xs in totals.items():
            print(f"  {name:<36} {' '.join(f'{x:6.2f}' for x, _ in xs)} s   (CPU s at healthy: "
                  f"{' '.join(f'{c:5.1f}' for _, c in xs)})")


def _report(i: int, proxy: str, placement: str, names: list[str], tree: str | None = None) -> tuple[float, float]:
    load0 = os.getloadavg()[0]
    phases = once(names, proxy, placement, tree)
    total = phases[-1][1]
    print(f"\nrun {i + 1} (models {', '.join(names)}; http.proxy: {proxy}, placement: {placement}"
          f"{', from ' + tree if tree else ''}): "
          f"load average {load0:.1f} -> "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'phase':<40} {'seconds':>8} {'share':>7}")
    for name, secs in phases:
        share = "" if name.startswith("CPU") else f"{secs / total:>7.0%}"
        print(f"{name:<40} {secs:>8.2f} {share:>7}")
    print(f"target 10 s: {'OK' if total <= 10 else 'OVER'} ({total / 10:.2f}x)")
    return total, phases[-2][1]

if __name__ == "__main__":
    main()
