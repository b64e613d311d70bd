"""Sink pieces that need no Ray: buffering out-of-order and re-delivered rows, file names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.config import StorageConfig
from pipeline.sink import Lake, SlideBuffer, read_slides, read_tiles, safe_name, slide_row

META = {"tile_px": 224, "tile_l0": 448.0, "target_mpp": 0.5, "level": 0, "mpp": 0.25,
        "level_downsample": 1.0, "read_mpp": 0.5}


def batch(idx: list[int], dim: int = 4) -> dict[str, np.ndarray]:
    n = len(idx)
    i = np.array(idx, np.int64)
    return {"index": i, "x": i * 10, "y": i * 20, "tissue": np.full(n, 0.5, np.float32),
            "emb__m": np.repeat(i[:, None], dim, 1).astype(np.float16),
            "meta": np.array([json.dumps(META)] + [""] * (n - 1), dtype=object),
            "t_chunk": np.full(n, 1.0), "rss_mb": np.full(n, 100.0, np.float32)}


def test_buffer_completes_only_with_every_tile_and_ignores_redelivery() -> None:
    buf = SlideBuffer("s", 5, {"m": 4})
    for idx in ([3, 4], [0], [3, 4]):  # out of order, one chunk delivered twice
        b = batch(idx)
        buf.add(np.arange(len(idx)), b, {"m": "emb__m"})
    assert not buf.complete
    b = batch([1, 2])
    buf.add(np.arange(2), b, {"m": "emb__m"})
    assert buf.complete
    t = buf.tiles_table("m")
    assert t["tile_index"].to_pylist() == [0, 1, 2, 3, 4]
    assert t["x"].to_pylist() == [0, 10, 20, 30, 40]
    assert t.schema.field("embedding").type == pa.list_(pa.float16(), 4)
    assert buf.mean_embedding("m").tolist() == [[2.0] * 4]


def test_commit_overwrites_deterministic_files(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path), StorageConfig())
    buf = SlideBuffer("a/b c", 2, {"m": 4})
    buf.add(np.arange(2), batch([0, 1]), {"m": "emb__m"})
    row = slide_row(4, [{"slide_id": "a/b c", "work_key": "k1", "num_tiles": 2}],
                    buf.mean_embedding("m"))
    for _ in range(2):
        lake.commit_slide("m", "c1", "a/b c", buf.tiles_table("m"), row)
    assert read_tiles(str(tmp_path)).num_rows == 2
    assert lake.committed()[("a/b c", "m")].work_key == "k1"
    # moving cohort retires the old copy
    lake.commit_slide("m", "c2", "a/b c", buf.tiles_table("m"), row, stale_cohort="c1")
    slides = read_slides(str(tmp_path))
    assert slides["cohort"].to_pylist() == ["c2"] and read_tiles(str(tmp_path)).num_rows == 2
    assert not list(tmp_path.rglob(".tmp-*"))


def test_safe_names() -> None:
    assert safe_name("TCGA-05-4244-01Z") == "TCGA-05-4244-01Z"
    odd = safe_name("a/b c")
    assert "/" not in odd and odd != safe_name("a/b_c") and odd.startswith("a_b_c-")
