"""Error rows and run records that storage would not take: kept on local disk, written later.

When the lake's storage stays down past ``storage.retry_budget_s`` at the end of a run, what
the run knows about its failures must not be lost with the process. The coordinator keeps each
unwritten batch of error rows (as Parquet, with the transaction number it was to be written
under) and the run record in ``<sink.unsaved_dir>/<run_id>/``, and the run fails naming that
folder. The next run on the same lake from this machine writes them first, each batch under its
original transaction number, so a batch that did land before the fault is not written twice.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.sink import ERRORS_SCHEMA, Lake

log = logging.getLogger("pipeline")
_LAKE, _RECORD = "lake.txt", "run.json"


class UnsavedRecords(RuntimeError):
    """The run ended with records that only exist on local disk; the message says where."""


def unsaved_root(configured: str | None) -> Path:
    if configured:
        return Path(configured)
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                             "state")
    return Path(state) / "wsi-pipeline" / "unsaved"


def keep(root: Path, lake_url: str, run_id: str, app_id: str,
         batches: list[tuple[int, list[dict[str, Any]]]],
         record: dict[str, Any] | None) -> Path:
    """Write what could not reach the lake to ``root/run_id``; returns that folder."""
    d = root / run_id
    d.mkdir(parents=True, exist_ok=True)
    (d / _LAKE).write_text(json.dumps({"lake": lake_url, "app_id": app_id}))
    for version, rows in batches:
        tmp = d / f".errors-{version:08d}.parquet.partial"
        pq.write_table(pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA), tmp)
        os.replace(tmp, d / f"errors-{version:08d}.parquet")
    if record is not None:
        tmp = d / f".{_RECORD}.partial"
        tmp.write_text(json.dumps(record, indent=2, default=str))
        os.replace(tmp, d / _RECORD)
    return d


def recover(lake: Lake, root: Path) -> list[dict[str, Any]]:
    """Write every kept folder that belongs to ``lake``; a folder leaves disk once written."""
    done = []
    if not root.is_dir():
        return done
    for d in sorted(p for p in root.iterdir() if (p / _LAKE).is_file()):
        meta = json.loads((d / _LAKE).read_text())
        if meta.get("lake") != lake.url:
            continue
        rows = 0
        for f in sorted(d.glob("errors-*.parquet")):
            version = int(f.stem.split("-")[1])
            table = pq.read_table(f)
            lake.write_errors(table.to_pylist(), txn=(meta["app_id"], version))
            rows += table.num_rows
            f.unlink()
        record_file = d / _RECORD
        wrote_record = record_file.is_file()
        if wrote_record:
            lake.write_run(d.name, json.loads(record_file.read_text()))
            record_file.unlink()
        shutil.rmtree(d)
        log.warning("run %s: wrote %d error rows%s that storage refused at its end and that "
                    "were kept in %s", d.name, rows, " and its run record" if wrote_record
                    else "", d)
        done.append({"run_id": d.name, "error_rows": rows, "run_record": wrote_record})
    return done
