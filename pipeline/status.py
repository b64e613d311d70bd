"""`python -m pipeline status OUT`: what the lake's latest (or running) job is doing.

Reads only the lake: the lease (is a job running now, which one), the newest run record (its
status, progress as of its last update, counts) and the errors status (what is failing now).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.config import StorageConfig
from pipeline.lease import LEASE_FILE
from pipeline.sink import Lake, read_errors
from pipeline.storage import join


def lake_status(url: str, storage: StorageConfig | None = None, last_errors: int = 5
                ) -> dict[str, Any]:
    lake = Lake(url, storage)
    try:
        lease = json.loads(lake.fs.cat_file(join(lake.root, LEASE_FILE)))
    except FileNotFoundError:
        lease = None
    runs = lake.run_records()
    latest = json.loads(lake.fs.cat_file(runs[-1]["name"])) if runs else None
    errors = read_errors(url, storage=storage, current=True).to_pylist()
    errors.sort(key=lambda r: r["failed_at"], reverse=True)
    keep = ("slide_id", "model", "stage", "reason", "run_id", "failed_at")
    return {
        "lake": url,
        "running": lease.get("run_id") if lease else None,
        "runs": len(runs),
        "latest": None if latest is None else {
            k: latest.get(k) for k in ("run_id", "status", "error", "started_at",
                                       "finished_at", "progress", "counts", "report")},
        "failing_now": len(errors),
        "last_errors": [{k: str(r[k]) if r[k] is not None else None for k in keep}
                        for r in errors[:last_errors]],
    }


def render(status: dict[str, Any]) -> str:
    lines = [f"lake {status['lake']}: {status['runs']} runs; "
             + (f"running now: {status['running']}" if status["running"] else "no job running")]
    latest = status["latest"]
    if latest:
        lines.append(f"latest run {latest['run_id']}: {latest['status']}"
                     + (f" ({latest['error']})" if latest.get("error") else ""))
        p = latest.get("progress") or {}
        if p:
            eta = p.get("eta_s")
            lines.append(f"  {p.get('slides_committed')}/{p.get('slides_planned')} slides "
                         f"committed, {p.get('slides_failed')} failed, "
                         f"{p.get('tiles_committed')} tiles, "
                         f"{p.get('tiles_per_s_last_minute')} tiles/s (last minute)"
                         + (f", ETA {eta // 60}m{eta % 60:02d}s" if eta else "")
                         + f" (as of {p.get('at')})")
        for model, n in ((latest.get("counts") or {}).get("committed") or {}).items():
            lines.append(f"  {model}: {n} slides committed by this run")
        if latest.get("report"):
            lines.append(f"  report: {join(status['lake'], latest['report'])}")
    lines.append(f"failing now: {status['failing_now']} (slide, model) pairs")
    for e in status["last_errors"]:
        lines.append(f"  {e['slide_id']} [{e['model'] or 'all models'}] {e['stage']}: "
                     f"{(e['reason'] or '')[:160]}")
    return "\n".join(lines)
