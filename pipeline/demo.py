"""Offline demo: the main job on bundled real slides, embedded local Ray, local files.

No weights can be assumed on a fresh machine, so the demo runs kaiko ViT-S/16 with
`weights: random` and says so loudly; the README shows the one-line change for real weights.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import yaml

from pipeline.config import load_config

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"

BANNER = """
==============================================================================
 DEMO: kaiko-vits16 with RANDOM weights (no weights are staged on this machine).
 The embeddings are meaningless; every output row says random_weights=true.
 For real weights change one line in {job}:
     weights: random   ->   weights: hub            (and export HF_TOKEN=...)
                      or   weights: /path/to/model.safetensors
==============================================================================
"""


def write_demo_job(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    slides = [
        ("CMU-1-Small-Region", DATA / "CMU-1-Small-Region.svs", "skin", "", "H&E"),
        # A synthetic generic TIFF without mpp in the file: the manifest supplies it.
        ("boxes", DATA / "boxes-generic.tiff", "synthetic", "0.5", "none"),
        # Smaller than one tile: ends as an error row with the reason.
        ("tiny-16px", DATA / "tiny-16px.svs", "skin", "", "H&E"),
    ]
    if not all(p.is_file() for _, p, *_ in slides):
        raise SystemExit(f"demo slides not found under {DATA}: run the demo from a checkout")
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "uri", "cohort", "mpp", "stain"])
        for sid, path, cohort, mpp, stain in slides:
            w.writerow([sid, str(path), cohort, mpp, stain])
    job = out / "job.yaml"
    job.write_text(yaml.safe_dump({
        "manifest": str(manifest),
        "output": str(out / "lake"),
        "models": [{"id": "kaiko-vits16", "weights": "random", "batch_size": 32}],
        "tiling": {"mpp": 0.5, "tile_size": 224, "min_tissue": 0.25},
        "ray": {"num_cpus": 2},
    }, sort_keys=False))
    return job


def run_demo(out: Path) -> int:
    from pipeline.run import run_job
    from pipeline.sink import read_errors

    out = out.resolve()
    job = write_demo_job(out)
    print(BANNER.format(job=job))
    cfg = load_config(job)
    t0 = time.time()
    record = run_job(cfg)
    wall = time.time() - t0
    tiles = sum(record["counts"]["tiles_encoded"].values())
    logging.getLogger("pipeline").warning("demo used RANDOM weights: embeddings are meaningless "
                                          "(real weights: one line in %s)", job)
    print(f"run {record['run_id']}: {record['status']} in {wall:.1f}s, "
          f"{tiles} tiles encoded ({tiles / max(wall, 1e-9):.1f} tiles/s incl. Ray start-up)")
    print(f"committed: {record['counts']['committed']}, errors: {record['counts']['errors']}")
    lake = out / "lake"
    print(f"\noutputs under {lake}:")
    for sub in ("tiles", "slides", "errors", "runs", "previews"):
        print(f"  {lake / sub}")
    if record.get("report"):
        print(f"\nthe run's report (open in a browser): {lake / record['report']}")
    print("\nread them from Python (DuckDB views over the committed rows):")
    print(f"  from pipeline.sink import duckdb_connect; con = duckdb_connect({str(lake)!r})")
    print('  con.sql(\'SELECT slide_id, num_tiles FROM "slides_kaiko-vits16"\').show()')
    try:
        from pipeline.sink import duckdb_connect

        con = duckdb_connect(str(lake))
        for view in sorted(r[0] for r in con.sql("SHOW TABLES").fetchall()
                           if r[0].startswith("slides_")):
            print(con.sql(f'SELECT cohort, slide_id, num_tiles, random_weights FROM "{view}" '
                          "ORDER BY slide_id"))
        con.register("errors", read_errors(str(lake), record["run_id"]))
        print(con.sql("SELECT slide_id, stage, reason FROM errors"))
    except ImportError:  # duckdb is a dev dependency
        pass
    return 0 if record["status"] == "succeeded" else 1
