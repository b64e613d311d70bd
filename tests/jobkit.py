"""Helpers for end-to-end job tests: manifests, job files, and reading a lake back."""

from __future__ import annotations

import csv
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from pipeline.config import JobConfig, SinkConfig, StorageConfig, build_config
from pipeline.sink import read_errors, read_slides, read_tiles

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]


BIN = Path(sys.executable).parent
# For `ray start` / `ray job submit` / job subprocesses: the cluster's Python is this
# environment's (as in a container image with the package); token auth off, so a token left
# in ~/.ray by another run cannot change the result.
CLUSTER_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "PYTHONUNBUFFERED": "1", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}


def source_snapshot() -> Path:
    """The package's sources as a clean checkout has them, for `ray job submit --working-dir`.

    Submitting the repository itself packs whatever is in it at that moment (caches, .pyc
    files that other processes are writing); a snapshot, as a deploy ships, packs only code."""
    dest = Path(tempfile.mkdtemp(prefix="wsi-src-"))
    shutil.copytree(REPO / "pipeline", dest / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def generated_cohort(d: Path, n: int, *, seed: int, width: int = 1400, height: int = 1100,
                     cohort: str = "c") -> list[dict[str, Any]]:
    """``n`` generated 0.5 um/px slides in ``d``, as manifest rows ``s0``, ``s1``, ..."""
    from slidegen import write_pyramid_svs

    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        write_pyramid_svs(d / f"s{i}.svs", width=width, height=height, mpp=0.5, levels=(1, 4),
                          seed=seed + i)
        rows.append({"slide_id": f"s{i}", "uri": str(d / f"s{i}.svs"), "cohort": cohort})
    return rows


def write_manifest(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    rows = list(rows)
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


# Writer actors per pass in test jobs, where a test does not set sink.writers itself. Each is
# a process of its own (~1 CPU-s to start) and most test jobs have two or three slides; the
# tests of several writers (streaming, faults, kills, nodes lost) ask for the default.
TEST_WRITERS = 1
SEVERAL_WRITERS = SinkConfig().writers


def job_config(manifest: str, output: str, models: list[str] | None = None,
               **extra: Any) -> JobConfig:
    data: dict[str, Any] = {
        "manifest": manifest, "output": output,
        "models": [{"id": m, "weights": "random", "batch_size": 32}
                   for m in (models or ["kaiko-vits16"])],
        "tiling": {"mpp": 0.5, "tile_size": 224, "chunk_tiles": 16},
        "errors_flush_seconds": 1.0,
    }
    sink = {"writers": TEST_WRITERS, **extra.pop("sink", {})}
    data.update(extra, sink=sink)
    return build_config(data)


def write_job(path: Path, cfg: JobConfig) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(exclude_defaults=True), sort_keys=False))
    return path


def copy_slide(name: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / name, dest)
    return dest


def embeddings(table: pa.Table) -> np.ndarray:
    col = table["embedding"].combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)


def lake_snapshot(output: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """Content of a lake that must not depend on timing: tiles keyed by (model, slide, x, y)."""
    tiles = read_tiles(output, storage=storage)
    slides = read_slides(output, storage=storage)
    emb = embeddings(tiles)
    keys = list(zip(tiles["model"].to_pylist(), tiles["slide_id"].to_pylist(),
                    tiles["x"].to_pylist(), tiles["y"].to_pylist(), strict=True))
    volatile = {"run_id", "committed_at", "tiling_started_at", "embedding"}
    srows = sorted(
        ({k: v for k, v in r.items() if k not in volatile} for r in slides.to_pylist()),
        key=lambda r: (r["model"], r["slide_id"]))
    return {"keys": keys, "emb": dict(zip(keys, emb, strict=True)), "slides": srows}


def errors_by_slide(output: str, run_id: str, storage: StorageConfig | None = None
                    ) -> dict[str | None, dict[str, Any]]:
    return {r["slide_id"]: r for r in read_errors(output, run_id, storage).to_pylist()}


def assert_same_lake(a: dict[str, Any], b: dict[str, Any], atol: float = 0.0) -> None:
    """Same tile keys (no duplicates), same slide rows, embeddings equal within ``atol``."""
    assert len(b["keys"]) == len(set(b["keys"])), "duplicate tiles"
    assert sorted(a["keys"]) == sorted(b["keys"])
    assert a["slides"] == b["slides"]
    for key, emb in a["emb"].items():
        np.testing.assert_allclose(emb.astype(np.float32), b["emb"][key].astype(np.float32),
                                   atol=atol, rtol=0)


def readme_blocks(start: str, end: str = "\n### ") -> list[str]:
    """The python blocks of the README between the heading ``start`` and the next ``end``."""
    section = (REPO / "README.md").read_text().split(start, 1)[1].split(end, 1)[0]
    return re.findall(r"```python\n(.*?)```", section.split("<!--", 1)[0], flags=re.S)


def readme_read_snippets() -> list[str]:
    """The python blocks of the README's "Reading the outputs" section, in order."""
    return readme_blocks("### Reading the outputs")


def exec_snippet(code: str, out: str) -> dict[str, Any]:
    """Run a README block as written, its ``"OUT`` standing for the lake ``out``."""
    scope: dict[str, Any] = {}
    exec(compile(code.replace('"OUT', '"' + out), "README.md", "exec"), scope)
    return scope
