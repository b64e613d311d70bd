"""A PyTorch ``Dataset`` of per-slide bags for multiple-instance learning on the lake.

Each item is one committed slide of one model: its tile embeddings in tiling order, their
level-0 coordinates and, where asked, a label taken from the manifest's extra columns (kept in
the slides row's ``extra``). The slides table's snapshot says which slides are committed and
names each slide's tiles file, so an item is one object read, and uncommitted files (a killed
run's) are never seen. Works on any fsspec URL; with ``num_workers > 0`` each worker opens
its own filesystem.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.config import StorageConfig
from pipeline.sink import SLIDES, TILES, Lake, _slides_of
from pipeline.storage import join


class SlideBags:
    """``bags[i]`` -> {"slide_id", "cohort", "embeddings" (N, D) float32 tensor,
    "coords" (N, 2) int64 tensor (x, y level-0 px), "label" (if ``label`` is given)}."""

    def __init__(self, url: str, model: str, *, label: str | None = None,
                 label_map: Callable[[Any], Any] | None = None,
                 slide_ids: Iterable[str] | None = None,
                 storage: StorageConfig | None = None):
        self.url, self.model, self.storage = url, model, storage or StorageConfig()
        lake = Lake(url, self.storage)
        if lake.delta(SLIDES, model) is None:
            raise FileNotFoundError(f"no slides table for model {model!r} under {url}; "
                                    f"models there: {', '.join(lake.models(SLIDES)) or 'none'}")
        rows = _slides_of(lake, model, ["slide_id", "cohort", "tiles_path", "extra"])
        wanted = set(slide_ids) if slide_ids is not None else None
        self.items: list[dict[str, Any]] = []
        for r in sorted(rows.to_pylist(), key=lambda r: r["slide_id"]):
            if wanted is not None and r["slide_id"] not in wanted:
                continue
            if not r["tiles_path"]:
                raise ValueError(f"{model!r} has no tiles of its own (a slide encoder?): "
                                 "bags need a tile model")
            item = {"slide_id": r["slide_id"], "cohort": r["cohort"],
                    "path": join(lake.table_path(TILES, model), r["tiles_path"])}
            if label is not None:
                extra = json.loads(r["extra"] or "{}")
                if label not in extra:
                    raise KeyError(f"slide {r['slide_id']!r} has no manifest column {label!r} "
                                   f"(its extra columns: {', '.join(extra) or 'none'})")
                item["label"] = label_map(extra[label]) if label_map else extra[label]
            self.items.append(item)
        if wanted is not None and len(self.items) < len(wanted):
            missing = sorted(wanted - {i["slide_id"] for i in self.items})
            raise KeyError(f"not committed for {model!r}: {', '.join(missing[:10])}")
        self._fs: Any = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        if self._fs is None:  # per process: fsspec filesystems do not cross fork well
            self._fs = Lake(self.url, self.storage).fs
        item = self.items[i]
        with self._fs.open(item["path"], "rb") as fh:
            t = pq.read_table(fh, columns=["tile_index", "x", "y", "embedding"])
        order = np.argsort(t["tile_index"].to_numpy())
        emb = t["embedding"].combine_chunks()
        x = emb.values.to_numpy(zero_copy_only=False).reshape(len(emb), emb.type.list_size)
        coords = np.stack([t["x"].to_numpy(), t["y"].to_numpy()], axis=1)
        out = {"slide_id": item["slide_id"], "cohort": item["cohort"],
               "embeddings": torch.from_numpy(np.ascontiguousarray(x[order], np.float32)),
               "coords": torch.from_numpy(np.ascontiguousarray(coords[order], np.int64))}
        if "label" in item:
            out["label"] = item["label"]
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}
