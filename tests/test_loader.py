"""The MIL data loader reads committed slides only, one bag per slide, with labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_sink import DIM, full_buffer, slide_rows

from pipeline.loader import SlideBags
from pipeline.sink import Lake


def commit(lake: Lake, sid: str, label: str | None, n: int, committed: bool = True) -> None:
    buf = full_buffer(sid, n=n, value=float(len(sid)))
    buf.x[:] = np.arange(n)[::-1] * 100  # coordinates follow tiling order, not file order
    f = lake.write_tiles("m", "c", sid, "k" + sid, buf.tiles_table("m", "k" + sid, "float32"))
    lake.commit_tiles("m", DIM, [f])
    if committed:
        extra = "{}" if label is None else f'{{"diagnosis": "{label}"}}'
        row = {"slide_id": sid, "work_key": "k" + sid, "tiles_path": f.path, "cohort": "c",
               "extra": extra, "num_tiles": n}
        lake.commit_slides("m", slide_rows([row], buf.mean_embedding("m")[None]), False)


@pytest.fixture
def lake(tmp_path: Path) -> str:
    lk = Lake(str(tmp_path))
    commit(lk, "a", "tumour", 3)
    commit(lk, "bb", "normal", 5)
    commit(lk, "killed", "tumour", 4, committed=False)  # tiles only: a kill between commits
    return str(tmp_path)


def test_bags_are_committed_slides_with_labels(lake: str) -> None:
    bags = SlideBags(lake, "m", label="diagnosis", label_map={"normal": 0, "tumour": 1}.get)
    assert [b["slide_id"] for b in bags] == ["a", "bb"]
    b = bags[1]
    assert b["embeddings"].shape == (5, DIM) and b["embeddings"].dtype == torch.float32
    assert torch.all(b["embeddings"] == 2.0) and b["label"] == 0 and b["cohort"] == "c"
    assert b["coords"][:, 0].tolist() == [400, 300, 200, 100, 0]
    loader = torch.utils.data.DataLoader(bags, batch_size=None, num_workers=2)
    assert sorted((x["slide_id"], x["label"]) for x in loader) == [("a", 1), ("bb", 0)]


def test_clear_errors(lake: str) -> None:
    with pytest.raises(KeyError, match="no manifest column 'stage'"):
        SlideBags(lake, "m", label="stage")
    with pytest.raises(KeyError, match="not committed for 'm': killed"):
        SlideBags(lake, "m", slide_ids=["a", "killed"])
    with pytest.raises(FileNotFoundError, match="models there: m"):
        SlideBags(lake, "uni")
    assert len(SlideBags(lake, "m", slide_ids=["bb"])) == 1
