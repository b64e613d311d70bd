"""Names of the columns that travel between stages (tiling -> encoders -> writers).

Torch-free on purpose: the writer stage and the router import these without paying for torch.
"""

from __future__ import annotations

TILE_COLUMN = "tile"       # uint8 (N, H, W, 3) tiles, dropped by the last encoder of a pass
MODELS_COLUMN = "models"   # comma-joined tile models a slide's rows are for
EMB_PREFIX = "emb__"
NODE_PREFIX = "node__"


def embedding_column(model_id: str) -> str:
    """Output column holding ``model_id``'s embeddings."""
    return EMB_PREFIX + model_id


def node_column(model_id: str) -> str:
    """Output column naming the Ray node that encoded each row (placement is auditable)."""
    return NODE_PREFIX + model_id
