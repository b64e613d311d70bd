"""The writer stage on a real local Ray: routing by slide, failures mid-slide, re-delivery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rowkit import meta_column

from pipeline.config import StorageConfig
from pipeline.handoff import embedding_column, node_column
from pipeline.qc import QC_COLUMNS
from pipeline.sink import read_tiles
from pipeline.writer import SinkWriter, WriterTask, route_to_writers, unpack, writer_of

pytestmark = pytest.mark.usefixtures("local_ray")


def rows(sid: str, idx: list[int], n: int, error: str = "") -> dict[str, np.ndarray]:
    k = len(idx)
    i = np.array(idx, np.int64)
    return {"slide_id": np.full(k, sid, object), "index": i, "x": i * 10, "y": i,
            "tissue": np.ones(k, np.float32), "num_tiles": np.full(k, n),
            **{c: np.full(k, 0.1, np.float32) for c in QC_COLUMNS},
            embedding_column("m"): np.full((k, 4), 0.5, np.float16),
            node_column("m"): np.full(k, "n1", object), "meta": meta_column(k),
            "t_chunk": np.ones(k), "rss_mb": np.ones(k, np.float32),
            "error": np.full(k, error, object), "error_stage": np.full(k, "read" if error else "",
                                                                      object)}


def cat(*batches: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {c: np.concatenate([b[c] for b in batches]) for c in batches[0]}


def test_routing_mid_slide_failure_and_redelivery(tmp_path: Path) -> None:
    import ray

    tasks = {s: WriterTask("c", ("m",), {"m": f"key-{s}"}) for s in ("ok", "broken")}
    n = 2
    shards = [{s: t for s, t in tasks.items() if writer_of(s, n) == w} for w in range(n)]
    writers = [ray.remote(SinkWriter).remote(str(tmp_path), StorageConfig(),
                                             "float32", shard) for shard in shards]
    first = route_to_writers(cat(rows("ok", [0, 1], 3), rows("broken", [0], 2)),
                             writers=writers)
    assert list(first["slide_id"]) == ["broken", "ok"] and not any(first["result"])
    # the rest of "ok" (one row delivered twice, as after a retried task), and "broken"
    # failing after a tile: its error row wins over its tile rows
    last = route_to_writers(cat(rows("ok", [1, 2], 3), rows("broken", [1], 2),
                                rows("broken", [-1], 0, error="read failed")), writers=writers)
    by_id = dict(zip(last["slide_id"], range(2), strict=True))
    assert last["error"][by_id["broken"]] == "read failed"
    res = unpack(last["result"][by_id["ok"]])
    assert res is not None and res.num_tiles == 3 and res.files["m"].num_rows == 3
    np.testing.assert_allclose(res.means["m"], 0.5)
    assert res.encoder_nodes == {"m": ["n1"]}
    # a third delivery of a written slide is ignored
    again = route_to_writers(rows("ok", [2], 3), writers=writers)
    assert again["result"][0] == b""
    for w in writers:
        ray.kill(w)
    assert (tmp_path / "tiles" / "m" / "cohort=c" / f"ok-{'key-ok'[:16]}.parquet").is_file()
    with pytest.raises(FileNotFoundError):  # written, not committed: no reader sees it
        read_tiles(str(tmp_path))
