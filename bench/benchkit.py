"""What every benchmark here shares: the machine description and where results go."""

from __future__ import annotations

import json
import platform
import socket
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def cpu_model() -> str:
    """The CPU's marketing name (figures mean little without it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_results(kind: str, out: dict[str, Any]) -> Path:
    """``bench/results/<kind>_<host>.json``; returns the path written."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / f"{kind}_{socket.gethostname()}.json"
    dest.write_text(json.dumps(out, indent=1, default=float) + "\n")
    return dest
