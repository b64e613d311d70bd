"""Planning a job: which (slide, model) pairs to compute, from listings and the lake's snapshot.

    manifest -> slide fingerprints from directory listings (one LIST per ~1,000 objects, not
    one HEAD per slide) -> work keys -> compared with the committed rows of each model's slides
    table (one snapshot read, not one GET per committed slide) -> SlideTasks and error rows
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline import __version__
from pipeline.config import JobConfig, SlideEncoderConfig, TilingConfig
from pipeline.fileset import FileSetError
from pipeline.manifest import Manifest, SlideEntry, read_manifest
from pipeline.models import specs
from pipeline.models.specs import get_slide_model
from pipeline.models.weights import (
    WeightsRef,
    check_checkpoint,
    check_slide_checkpoint,
    resolve_weights,
)
from pipeline.sink import CommittedSlide, Lake, now
from pipeline.slide_encode import work_key_settings
from pipeline.storage import Fingerprint, fingerprints

log = logging.getLogger("pipeline")

# bump when an embedding recipe changes meaning: forces recomputation
# 2: the device resize reproduces PIL's integer arithmetic (tiles that are resized change by
#    up to ~6e-4 relative)
RECIPE_VERSION = 2
TILE_ORDER = "row-major"


def code_version() -> str:
    return __version__


def work_key(fp: Fingerprint, model_id: str, weights: WeightsRef, tiling: TilingConfig) -> str:
    """Everything that changes a slide's rows for a model; equal keys mean nothing to redo."""
    parts = [str(fp), model_id, weights.identity, tiling.spec_hash(), RECIPE_VERSION]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def slide_work_key(tile_key: str, weights: WeightsRef, cfg: SlideEncoderConfig) -> str:
    """A slide encoder's output depends on its input tile embeddings and its own settings."""
    parts = [tile_key, cfg.id, weights.identity, sorted(cfg.layers), cfg.global_pool,
             *work_key_settings(cfg)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def model_tiling(cfg: JobConfig) -> dict[str, TilingConfig]:
    """Each model's tiling: its declared field of view unless the job fixes mpp/tile size."""
    return {m.id: cfg.tiling.for_model(*specs.tiling_spec(specs.get(m.id)))
            for m in cfg.models}


def tiling_groups(cfg: JobConfig) -> list[tuple[TilingConfig, list[str]]]:
    """Models that share a tiling spec share one tiling pass."""
    groups: dict[str, tuple[TilingConfig, list[str]]] = {}
    for model_id, tiling in model_tiling(cfg).items():
        groups.setdefault(tiling.spec_hash(), (tiling, []))[1].append(model_id)
    return list(groups.values())


def slide_encoders(cfg: JobConfig) -> dict[str, SlideEncoderConfig]:
    """tile model id -> its slide encoder config, for models that have one."""
    return {m.id: m.slide_encoder for m in cfg.models if m.slide_encoder is not None}


@dataclass
class SlideTask:
    entry: SlideEntry
    fingerprint: Fingerprint
    models: list[str]  # tile models to run; their slide encoders run with them
    work_keys: dict[str, str]  # per output model (tile models and slide encoders)
    # per output model to compute: its committed row, which the new one replaces (or None)
    previous: dict[str, CommittedSlide | None] = field(default_factory=dict)


@dataclass
class Plan:
    manifest: Manifest
    weights: dict[str, WeightsRef]  # per output model (tile models and slide encoders)
    tasks: list[SlideTask]
    errors: list[dict[str, Any]]
    up_to_date: dict[str, int]

    def summary(self) -> dict[str, Any]:
        per_model = {m: sum(m in t.previous for t in self.tasks)
                     for m in self.weights}
        return {
            "manifest_rows": len(self.manifest.entries) + len(self.manifest.problems),
            "slides_to_process": len(self.tasks),
            "work_per_model": per_model,
            "up_to_date_per_model": self.up_to_date,
            "errors_before_tiling": len(self.errors),
        }


def error_row(*, slide_id: str | None, uri: str | None, cohort: str | None, stage: str,
              reason: str, model: str | None = None, row: int | None = None,
              preview_path: str | None = None, geojson_path: str | None = None
              ) -> dict[str, Any]:
    return {"slide_id": slide_id, "uri": uri, "cohort": cohort, "model": model, "stage": stage,
            "reason": plain_text(reason), "manifest_row": row, "failed_at": now(),
            "preview_path": preview_path, "geojson_path": geojson_path}


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain_text(message: str) -> str:
    """Error text as a table cell: no terminal colour codes (Ray and delta-rs add them)."""
    return _ANSI.sub("", message)


def resolve_all_weights(cfg: JobConfig) -> dict[str, WeightsRef]:
    """Fails the job, before any slide is touched, when any model's weights are unusable."""
    refs = {}
    for m in cfg.models:
        refs[m.id] = resolve_weights(m, cfg.storage)
        if not refs[m.id].random:
            checked(m.id, check_checkpoint(specs.get(m.id), refs[m.id], cfg.storage))
        if m.slide_encoder is not None:
            s = m.slide_encoder
            refs[s.id] = resolve_weights(s, cfg.storage, spec=get_slide_model(s.id))
            if not refs[s.id].random:
                checked(s.id, check_slide_checkpoint(get_slide_model(s.id), refs[s.id],
                                                     cfg.storage))
    for model_id, ref in refs.items():
        if ref.random:
            log.warning("=" * 78)
            log.warning("MODEL %s RUNS WITH RANDOM WEIGHTS (%s): its embeddings are meaningless. "
                        "Recorded as random_weights=true in every output row.",
                        model_id, ref.identity)
            log.warning("=" * 78)
    return refs


def checked(model_id: str, done: bool) -> None:
    if not done:
        log.info("%s: weights not in the driver's cache; their keys are checked when the "
                 "encoder actors load them", model_id)


def plan_job(cfg: JobConfig, lake: Lake, weights: dict[str, WeightsRef] | None = None,
             manifest: Manifest | None = None) -> Plan:
    weights = weights or resolve_all_weights(cfg)
    manifest = manifest or read_manifest(cfg.manifest, cfg.storage, cfg.default_cohort)
    errors = [error_row(slide_id=p.slide_id, uri=p.uri, cohort=p.cohort, stage="manifest",
                        reason=p.reason, row=p.row) for p in manifest.problems]
    committed = lake.committed()
    slides_of = slide_encoders(cfg)
    tiling_of = model_tiling(cfg)
    tasks: list[SlideTask] = []
    up_to_date = {m: 0 for m in weights}
    prints = fingerprints([e.uri for e in manifest.entries], cfg.storage)
    for e in manifest.entries:
        fp = prints.get(e.uri)
        if isinstance(fp, FileNotFoundError) or fp is None:
            errors.append(error_row(slide_id=e.slide_id, uri=e.uri, cohort=e.cohort,
                                    stage="stage", reason=f"slide file not found: {e.uri}",
                                    row=e.row))
            continue
        if isinstance(fp, BaseException):  # any storage failure is this slide's error
            reason = str(fp) if isinstance(fp, FileSetError) else \
                f"cannot stat slide: {type(fp).__name__}: {fp}"  # members missing: it says
            if isinstance(fp, IsADirectoryError):
                reason = (f"slide uri names a folder that holds no .dcm files: {e.uri}; name "
                          "the slide file, or a folder of DICOM WSI instances")
            errors.append(error_row(slide_id=e.slide_id, uri=e.uri, cohort=e.cohort,
                                    stage="stage", row=e.row, reason=reason))
            continue
        keys = {m.id: work_key(fp, m.id, weights[m.id], tiling_of[m.id]) for m in cfg.models}
        for m, s in slides_of.items():
            keys[s.id] = slide_work_key(keys[m], weights[s.id], s)
        todo, previous_rows = [], {}
        for m in cfg.models:
            # A slide encoder needs its tile model's embeddings: both run, or neither.
            outputs = [m.id] + ([m.slide_encoder.id] if m.slide_encoder else [])
            previous = {o: committed.get((e.slide_id, o)) for o in outputs}
            if all(d and d.work_key == keys[o] and d.cohort == e.cohort
                   for o, d in previous.items()):
                for o in outputs:
                    up_to_date[o] += 1
                continue
            todo.append(m.id)
            previous_rows.update(previous)
        if todo:
            tasks.append(SlideTask(e, fp, todo, keys, previous_rows))
    return Plan(manifest, weights, tasks, errors, up_to_date)
