"""Read and validate a slide manifest (CSV or Parquet at any fsspec URL).

A bad row never stops the job: it becomes an error row with a reason, and the good rows run.
Only a manifest that cannot be read at all (missing file, unknown format) stops the job.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.config import StorageConfig
from pipeline.storage import resolve_relative, url_to_fs, with_retries

REQUIRED = ("slide_id", "uri")
KNOWN = ("slide_id", "uri", "cohort", "mpp")
# Partition values become directory names; keep them portable across pyarrow, DuckDB, Spark.
COHORT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ManifestError(ValueError):
    """The manifest as a whole cannot be used."""


@dataclass(frozen=True)
class SlideEntry:
    row: int  # 1-based data row number in the manifest, for messages
    slide_id: str
    uri: str
    cohort: str
    mpp: float | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ManifestProblem:
    row: int
    slide_id: str | None
    uri: str | None
    cohort: str | None
    reason: str


@dataclass
class Manifest:
    url: str
    entries: list[SlideEntry]
    problems: list[ManifestProblem]
    extra_columns: list[str]


def _read_table(url: str, storage: StorageConfig) -> pa.Table:
    fs, path = url_to_fs(url, storage)
    try:
        data = with_retries(lambda: fs.cat_file(path), storage, what=f"read manifest {url}")
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {url}") from None
    lower = path.lower()
    try:
        if lower.endswith((".parquet", ".pq")):
            return pq.read_table(io.BytesIO(data))
        if lower.endswith((".csv", ".csv.gz", ".tsv")):
            opts = pacsv.ParseOptions(delimiter="\t" if lower.endswith(".tsv") else ",")
            # Every column as text: ids like "0012" must not become integers, and "NA", "null"
            # or "N/A" are real ids and cohorts; only an empty cell is missing (see _text).
            head = pacsv.read_csv(io.BytesIO(data), parse_options=opts,
                                  read_options=pacsv.ReadOptions(skip_rows_after_names=10**9))
            types = {name: pa.string() for name in head.column_names}
            return pacsv.read_csv(
                io.BytesIO(data), parse_options=opts,
                convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False),
            )
    except (pa.ArrowInvalid, OSError) as err:
        raise ManifestError(f"manifest {url} could not be parsed: {err}") from None
    raise ManifestError(f"manifest {url}: unknown format (use .csv, .tsv or .parquet)")


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


def read_manifest(url: str, storage: StorageConfig, default_cohort: str = "default") -> Manifest:
    table = _read_table(url, storage)
    columns = table.column_names
    rows = table.to_pylist()
    missing = [c for c in REQUIRED if c not in columns]
    extra_cols = [c for c in columns if c not in KNOWN]
    if missing:
        reason = (f"manifest has no {', '.join(repr(c) for c in missing)} column "
                  f"(found: {', '.join(columns) or 'none'}); required: slide_id, uri")
        # A whole-manifest problem: no row can be right, so the job stops before any work.
        raise ManifestError(f"{url}: {reason}")

    entries: list[SlideEntry] = []
    problems: list[ManifestProblem] = []
    uris_by_id: dict[str, set[str]] = {}
    for r in rows:
        sid, uri = _text(r.get("slide_id")), _text(r.get("uri"))
        if sid and uri:
            uris_by_id.setdefault(sid, set()).add(uri)
    seen: dict[str, int] = {}
    for i, r in enumerate(rows, start=1):
        sid, uri, cohort = _text(r.get("slide_id")), _text(r.get("uri")), _text(r.get("cohort"))
        cohort = cohort or default_cohort

        def problem(reason: str, sid: str | None = sid, uri: str | None = uri,
                    cohort: str | None = cohort, row: int = i) -> None:
            problems.append(ManifestProblem(row, sid, uri, cohort, reason))

        if not sid:
            problem("empty slide_id")
            continue
        if not uri:
            problem("empty uri: give the slide's path or URL")
            continue
        if len(uris_by_id.get(sid, ())) > 1:
            problem(f"slide_id {sid!r} appears with different uris "
                    f"({', '.join(sorted(uris_by_id[sid]))}): make ids unique")
            continue
        if sid in seen:
            problem(f"duplicate row for slide_id {sid!r} (first at row {seen[sid]}); ignored")
            continue
        if not COHORT_RE.match(cohort):
            problem(f"cohort {cohort!r} is not a valid partition value: use letters, digits, "
                    "'.', '_' or '-' (max 128)")
            continue
        mpp: float | None = None
        raw_mpp = _text(r.get("mpp"))
        if raw_mpp is not None:
            try:
                mpp = float(raw_mpp)
            except ValueError:
                mpp = math.nan
            if not (math.isfinite(mpp) and 0 < mpp < 1000):
                problem(f"mpp {raw_mpp!r} is not a positive number of microns per pixel")
                continue
        seen[sid] = i
        extra = {c: _jsonable(r.get(c)) for c in extra_cols}
        entries.append(SlideEntry(i, sid, resolve_relative(uri, url), cohort, mpp, extra))
    return Manifest(url, entries, problems, extra_cols)
