"""Footprint of an idle server: PSS (sum over all its processes, /proc/*/smaps_rollup) and CPU (% of one core).

Starts ``twinkle-server launch`` (mock model; ``--tiny`` adds the transformers ``builtin://tiny`` model),
waits until it is healthy, lets it settle, then samples every process of the server (the launcher and all its
descendants: Ray's GCS, raylet, agents, Serve controller/proxy, gateway, workers) for ``--window`` seconds.
Targets: < 1.2 GB PSS, < 3 % of a core. Prints a per-process table and the totals, then stops the server
with SIGTERM and reports leftover processes.

    .venv/bin/python bench/idle.py [--tiny] [--settle 15] [--window 30] [--variants haproxy:replica,haproxy:auto] [--repeat 2]

A variant ``proxy:placement@TREE`` runs the server from another checkout (``auto:auto@/work/main``: main's own
code with its defaults), to compare a branch with main in one run. ``proxy:placement+telemetry`` turns
``telemetry.enabled`` on (Prometheus exposition open, no OTLP endpoint); with ``--scrape S`` the bench also reads
``/metrics`` every S seconds during the window, as a Prometheus server would (its own CPU is not counted):

    .venv/bin/python bench/idle.py --variants auto:auto,auto:auto+telemetry --repeat 2 [--scrape 15]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _serverproc as sp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="also host builtin://tiny (transformers)")
    ap.add_argument("--settle", type=float, default=15.0)
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--variants", default="haproxy:auto",
                    help="comma-separated http.proxy:placement pairs measured one after the other (repeated "
                         "--repeat times, alternating), e.g. haproxy:replica,haproxy:auto,direct:auto; "
                         "a pair followed by @TREE runs that checkout's server (auto:auto@/work/main)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--scrape", type=float, default=0.0,
                    help="with +telemetry: GET /metrics every this many seconds during the window (0: never)")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    totals: dict[str, list[tuple[int, float, float]]] = {}
    for _ in range(args.repeat):
        for variant in variants:
            pair, _, tree = variant.partition("@")
            pair, _, flag = pair.partition("+")
            if flag not in ("", "telemetry"):
                raise SystemExit(f"unknown variant flag +{flag} (only +telemetry)")
            proxy, placement = pair.split(":")
            totals.setdefault(variant, []).append(
                measure(args.tiny, args.settle, args.window, proxy, placement, tree or None,
                        telemetry=flag == "telemetry", scrape=args.scrape))
    print("\nvariant (http.proxy:placement)    processes   PSS MB   CPU % of a core (each run)")
    for name, runs in totals.items():
        print(f"  {name:<32} {' '.join(str(r[0]) for r in runs):>9}  {' '.join(f'{r[1]:.0f}' for r in runs)}  "
              f"{' '.join(f'{r[2]:.2f}' for r in runs)}")


def measure(tiny: bool, settle: float, window: float, proxy: str, placement: str,
            tree: str | None = None, telemetry: bool = False, scrape: float = 0.0) -> tuple[int, float, float]:
    work = Path(tempfile.mkdtemp(prefix="twinkle-idle-"))
    models = [{**m, "placement": placement} for m in [sp.MOCK_MODEL] + ([sp.TINY_MODEL] if tiny else [])]
    extra: dict[str, object] = {}
    if telemetry:
        extra["telemetry"] = {"enabled": True, "prometheus": {"access": "open"}}
    cfg, url = sp.write_config(work, models, proxy=proxy, **extra)
    log = work / "server.log"
    proc = sp.launch(cfg, log, env={"PYTHONPATH": tree} if tree else None, cwd=tree)
    try:
        ready = sp.wait_healthy(proc, url, log)
        print(f"\n[http.proxy {proxy}, placement {placement}{', telemetry on' if telemetry else ''}"
              f"{' from ' + tree if tree else ''}] healthy after {ready:.1f} s (load average "
              f"{os.getloadavg()[0]:.1f}); settling {settle:.0f} s")
        time.sleep(settle)
        procs = sp.tree(proc.pid)
        t0 = time.monotonic()
        cpu0 = {}
        for p in procs:
            try:
                c = p.cpu_times()
                cpu0[p.pid] = c.user + c.system + c.children_user + c.children_system
            except Exception:
                pass
        scrapes = 0
        if telemetry and scrape > 0:
            while time.monotonic() - t0 < window:
                with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
                    r.read()
                scrapes += 1
                time.sleep(max(0.0, min(scrape, window - (time.monotonic() - t0))))
        else:
            time.sleep(window)
        dt = time.monotonic() - t0
        rows = []
        for p in procs:
            try:
                c = p.cpu_times()
                cpu = (c.user + c.system + c.children_user + c.children_system - cpu0.get(p.pid, 0.0)) / dt * 100
            except Exception:
                continue
            rows.append((sp.label(p), p.pid, sp.pss_kb(p.pid) / 1024, cpu))
        rows.sort(key=lambda r: -r[2])
        print(f"\n{'process':<44} {'pid':>7} {'PSS MB':>8} {'CPU %':>7}")
        for name, pid, pss, cpu in rows:
            print(f"{name[:44]:<44} {pid:>7} {pss:>8.1f} {cpu:>7.2f}")
        tot_pss = sum(r[2] for r in rows)
        tot_cpu = sum(r[3] for r in rows)
        print(f"{'TOTAL (' + str(len(rows)) + ' processes)':<44} {'':>7} {tot_pss:>8.1f} {tot_cpu:>7.2f}")
        print(f"\ntarget: PSS < 1228.8 MB -> {'OK' if tot_pss < 1228.8 else 'OVER'} ({tot_pss / 1228.8:.2f}x); "
              f"CPU < 3 % -> {'OK' if tot_cpu < 3 else 'OVER'} ({tot_cpu / 3:.2f}x); "
              f"window {dt:.0f} s, load average {os.getloadavg()[0]:.1f}"
              f"{f', {scrapes} scrapes of /metrics' if scrapes else ''}")
        return len(rows), tot_pss, tot_cpu
    finally:
        took, left = sp.stop(proc, signal.SIGTERM)
        print(f"SIGTERM -> exited in {took:.1f} s; processes left behind: {left or 'none'}")


if __name__ == "__main__":
    main()
