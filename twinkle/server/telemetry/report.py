"""``twinkle-server usage``: the usage ledger as a table, JSON or CSV (reads the server's SQLite file)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from .usage import USAGE_COLUMNS, Usage, parse_time

__all__ = ["format_usage", "usage_report"]


def usage_report(store: Any, user: str | None, since: str | None, until: str | None) -> dict[str, Any]:
    t0, t1 = parse_time(since, field="since"), parse_time(until, field="until")
    return {"since": t0, "until": t1, "rows": Usage(store).report(user, t0, t1)}


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def format_usage(report: dict[str, Any], fmt: str) -> str:
    rows = report["rows"]
    if fmt == "json":
        return json.dumps(report, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(USAGE_COLUMNS), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in USAGE_COLUMNS})
        return buf.getvalue().rstrip("\n")
    head = ("user", "base_model", "trained", "prefilled", "sampled", "requests", "checkpoints")
    table = [head] + [(r["user"], r["base_model"], f"{r['tokens_trained']:,}", f"{r['tokens_prefilled']:,}",
                       f"{r['tokens_sampled']:,}", f"{r['requests']:,}",
                       f"{r['checkpoints']} ({_human_bytes(r['checkpoint_bytes'])})") for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) if 2 <= i <= 5 else str(c).ljust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip() for row in table]
    if not rows:
        lines.append("(no usage recorded in this window)")
    return "\n".join(lines)
