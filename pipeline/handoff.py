"""What travels between stages (tiling -> encoders -> writers -> coordinator), in one place.

Ray Data blocks are dicts of columns; this module names them, and types the one value that
rides in them as text: the tiling stage's word on a slide (:class:`TilingMeta`: its plan, where
and when it was tiled, its preview files, what reading it found), JSON in the ``meta`` column
of the first row of the slide's last chunk (or of its error row): only once every tile is read
is it known which were damaged. Torch-free on purpose: the writers and the router import it
without paying for torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from pipeline.qc import QC_COLUMNS

# Columns of a tiling-stage row (one tile, or one error row of a slide that failed).
SLIDE_ID = "slide_id"
TILE_COLUMN = "tile"       # uint8 (N, H, W, 3) tiles, dropped by the last encoder of a pass
INDEX = "index"            # position in the slide's row-major tiling order (-1: error row)
X, Y = "x", "y"            # level-0 top-left corner
TISSUE = "tissue"          # tissue fraction of the tile
NUM_TILES = "num_tiles"    # the slide's tile count (the writer waits for all of them)
MODELS_COLUMN = "models"   # comma-joined tile models a slide's rows are for
ERROR, ERROR_STAGE = "error", "error_stage"  # non-empty on a slide's error row
META = "meta"              # TilingMeta.encode() on one row of the slide (see above), else ""
T_CHUNK = "t_chunk"        # when the chunk left the tiler (epoch s)
RSS_MB = "rss_mb"          # the tiler's peak RSS so far
# What the writers keep of each row, besides the encoders' columns below.
WRITER_COLUMNS = (INDEX, X, Y, TISSUE, *QC_COLUMNS, META, T_CHUNK, RSS_MB)

EMB_PREFIX = "emb__"
NODE_PREFIX = "node__"


def embedding_column(model_id: str) -> str:
    """Output column holding ``model_id``'s embeddings."""
    return EMB_PREFIX + model_id


def node_column(model_id: str) -> str:
    """Output column naming the Ray node that encoded each row (placement is auditable)."""
    return NODE_PREFIX + model_id


def is_encoder_column(name: str) -> bool:
    return name.startswith((EMB_PREFIX, NODE_PREFIX))


@dataclass(frozen=True)
class SlidePlan:
    """Everything about a slide's tiling the sink records, known before any tile is read."""

    width: int  # level 0
    height: int
    mpp: float  # level-0 microns per pixel
    mpp_source: str  # "file" or "manifest"
    level: int  # pyramid level the tiles are read from
    level_downsample: float
    tile_px: int  # tile edge in delivered pixels
    tile_l0: float  # tile edge in level-0 pixels
    target_mpp: float
    num_tiles: int
    tissue_area_mm2: float
    vendor: str | None
    objective_power: float | None
    upsampled: bool  # level 0 is coarser than the target: tiles are interpolated
    # mpp of the delivered pixels: the target when resampled, the level's own mpp when it is
    # within mpp_tolerance of the target and tiles are read without resampling.
    read_mpp: float

    @property
    def level_mpp(self) -> float:
        return self.mpp * self.level_downsample


@dataclass(frozen=True)
class TilingMeta:
    """The tiling stage's word on one slide: its plan (None on an error row), where and when
    it was tiled, its preview files (lake-relative; None when there are none), and what
    reading it found."""

    started_at: float
    plan: SlidePlan | None = None
    node: str | None = None
    pid: int | None = None
    reader: str | None = None  # "tiff" (the direct JPEG path) or "openslide"
    preview_path: str | None = None
    geojson_path: str | None = None
    # What reading found and used, known once every tile is read (the slide's last chunk
    # carries this meta): reduced-size IDCT used for the tiles; why a faster way was not
    # used; tile indices delivered white because they lie on damaged JPEG tiles; the
    # decoders' complaints (and damaged thumbnail tiles), for a person.
    dct_downscale: bool | None = None
    read_note: str | None = None
    damaged: list[int] | None = None
    damage: str | None = None

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, text: str) -> TilingMeta:
        values: dict[str, Any] = json.loads(text)
        plan = values.pop("plan", None)
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown tiling meta fields {sorted(unknown)}")
        return cls(plan=SlidePlan(**plan) if plan is not None else None, **values)
