"""Distributed batch feature extraction for whole-slide images on Ray.

The few things a notebook or a script calls, importable from the package root (loaded on
first use: ``import pipeline`` stays cheap and imports neither Ray nor torch)::

    import pipeline
    cfg = pipeline.load_config("job.yaml", {"tiling.mpp": 0.5})   # or build_config(dict)
    plan = pipeline.plan_job(cfg)                                  # what a run would do
    record = pipeline.run_job(cfg)                                 # the run record (a dict)
    slides = pipeline.read_slides(cfg.output, model="uni")        # pyarrow tables
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_config": ("pipeline.config", "load_config"),
    "build_config": ("pipeline.config", "build_config"),
    "JobConfig": ("pipeline.config", "JobConfig"),
    "ConfigError": ("pipeline.config", "ConfigError"),
    "run_job": ("pipeline.run", "run_job"),
    "read_tiles": ("pipeline.sink", "read_tiles"),
    "read_slides": ("pipeline.sink", "read_slides"),
    "read_errors": ("pipeline.sink", "read_errors"),
    "duckdb_connect": ("pipeline.sink", "duckdb_connect"),
    "SlideBags": ("pipeline.loader", "SlideBags"),
    "lake_status": ("pipeline.status", "lake_status"),
    "write_report": ("pipeline.report", "write_report"),
}
__all__ = ["__version__", "plan_job", *_EXPORTS]


def plan_job(cfg: Any) -> Any:
    """The job's plan against its lake (``Plan``: tasks, errors, ``summary()``); no Ray."""
    from pipeline.plan import plan_job
    from pipeline.sink import Lake

    return plan_job(cfg, Lake(cfg.output, cfg.storage, cfg.sink.embedding_dtype))


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
