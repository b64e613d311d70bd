"""GPU placement: what each encoder actor asks of Ray, decided before any work starts.

Ray places an actor only where its whole request fits, and the job's pools are created up
front, so a request that can never fit does not fail: it waits forever. Here the job's GPU
demand is checked against the cluster's GPUs and either fits, by sharing GPUs, or stops with
the settings to change:

- A slide encoder runs briefly once per slide: it asks ``ray.slide_encoder_gpus`` (a fraction),
  and when the tile encoders would fill every GPU each of them asks that much less, so any GPU
  keeps room for it.
- Tile-encoder actors that run at once (the models of one tiling pass, and of every pass when
  the passes run together) and outnumber the GPUs share them: k actors per GPU each ask 1/k.
  A pass with two GPU models on one GPU then streams through both pools at once instead of
  running one after the other. More than ``ray.max_actors_per_gpu`` per GPU is refused (each
  actor holds its own copy of the model in GPU memory).

Fractions are Ray's scheduling bookkeeping only: actors sharing a GPU share its memory and
its compute, which for encoders that mostly wait on input is the point.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from pipeline.config import ConfigError, JobConfig

log = logging.getLogger("pipeline")

# Custom resources (tiler, encoder, writer nodes) are labels: each task or actor asks this
# little of one, so a node's label never bounds how many run there; CPUs and GPUs do.
LABEL_AMOUNT = 0.001


def on_nodes_labelled(resource: str | None) -> dict[str, dict[str, float]]:
    """Ray options that keep work on nodes advertising ``resource`` (none: anywhere)."""
    return {"resources": {resource: LABEL_AMOUNT}} if resource else {}


def ray_node_id() -> str:
    """The Ray node this process runs on ("" outside Ray), for recording where work ran."""
    try:
        import ray

        # Outside a Ray worker, asking for the runtime context would start a local Ray.
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - outside Ray
        return ""


@dataclass(frozen=True)
class Placement:
    """num_gpus per actor: tile models by id, slide encoders by their own id."""

    gpus: dict[str, float]
    slide_gpus: dict[str, float]
    actors_per_gpu: int = 1
    notes: list[str] = field(default_factory=list)
    encoder_cpus: float | None = None  # set by run_passes (fit_encoder_cpus)

    def summary(self) -> dict[str, object]:
        return {"gpus_per_actor": self.gpus, "slide_encoder_gpus": self.slide_gpus,
                "actors_per_gpu": self.actors_per_gpu, "encoder_cpus": self.encoder_cpus}


def place(cfg: JobConfig, groups: list[list[str]], use_gpu: dict[str, bool],
          cluster_gpus: float, concurrent: bool) -> Placement:
    """GPU requests for one job: ``groups`` are the tile models of each tiling pass (those with
    work), ``use_gpu`` says per tile model and per slide-encoder id whether it runs on a GPU;
    ``concurrent``: whether the passes run at the same time."""
    models = {m.id: m for m in cfg.models}
    active = [mid for g in groups for mid in g]
    slides = {m.slide_encoder.id: m.id for m in cfg.models
              if m.slide_encoder is not None and m.id in active}
    gpu_models = [mid for mid in active if use_gpu.get(mid)]
    gpu_slides = [sid for sid in slides if use_gpu.get(sid)]
    if not gpu_models and not gpu_slides:
        return Placement({mid: 0.0 for mid in active}, {sid: 0.0 for sid in slides})
    if cluster_gpus < 1:
        wanted = ", ".join(gpu_models + gpu_slides)
        raise ConfigError(
            f"{wanted} asked for a GPU (device: cuda) but the cluster has none: add GPU "
            "nodes, or set device: auto (falls back to CPU) or device: cpu")
    gpus = math.floor(cluster_gpus)
    per_pass = [sum(models[mid].actors for mid in g if use_gpu.get(mid)) for g in groups]
    at_once = sum(per_pass) if concurrent else max(per_pass, default=0)
    f = cfg.ray.slide_encoder_gpus
    slide_total = f * len(gpu_slides)
    if slide_total >= 1:
        raise ConfigError(
            f"{len(gpu_slides)} slide encoders x ray.slide_encoder_gpus={f:g} ask a whole GPU "
            "or more: lower ray.slide_encoder_gpus")
    k = max(1, math.ceil(at_once / gpus)) if at_once else 1
    if k > cfg.ray.max_actors_per_gpu:
        most = gpus * cfg.ray.max_actors_per_gpu
        counts = ", ".join(f"{mid}: actors {models[mid].actors}" for mid in gpu_models)
        raise ConfigError(
            f"{at_once} GPU encoder actors must run at once ({counts}) but the cluster has "
            f"{gpus} GPUs and ray.max_actors_per_gpu is {cfg.ray.max_actors_per_gpu}: lower "
            f"models[].actors to {most} in all, add GPUs, or raise ray.max_actors_per_gpu")
    share = 1.0 / k
    notes = []
    # Room for the slide encoders: a spare GPU if there is one, else a slice of every GPU.
    if gpu_slides and at_once and k == 1 and at_once + 1 > gpus:
        share = 1.0 - slide_total
        notes.append(f"tile encoders ask {share:g} GPU each so that slide encoders "
                     f"({f:g} GPU each) fit beside them")
    elif gpu_slides and k > 1:
        share = (1.0 - slide_total) / k
    if k > 1:
        notes.append(f"{at_once} GPU encoder actors on {gpus} GPUs: {k} share each GPU")
    tile = {mid: (round(share, 4) if use_gpu.get(mid) else 0.0) for mid in active}
    slide = {sid: (f if sid in gpu_slides else 0.0) for sid in slides}
    return Placement(tile, slide, k, notes)


def cpus_needed(cfg: JobConfig, groups: list[list[str]], concurrent: bool,
                encoder_cpus: float | None = None) -> tuple[float, int]:
    """CPUs that one tiling task per running pass and every encoder actor running at once
    reserve (each encoder actor, GPU or not, asks ``ray.encoder_cpus``), and those actors."""
    models = {m.id: m for m in cfg.models}
    per_pass = [sum(models[mid].actors for mid in g) for g in groups]
    actors = sum(per_pass) if concurrent else max(per_pass, default=0)
    tiling = cfg.ray.tiling_cpus * (len(groups) if concurrent else 1)
    each = cfg.ray.encoder_cpus if encoder_cpus is None else encoder_cpus
    return tiling + each * actors, actors


def fit_encoder_cpus(cfg: JobConfig, groups: list[list[str]], cluster_cpus: float,
                     concurrent: bool, fixed_size: bool) -> float:
    """``ray.encoder_cpus`` for this cluster: as configured where one tiling task and every
    encoder actor that runs at once fit; on a cluster that cannot grow (``fixed_size``: a
    local Ray) lowered until they do, or refused with the setting to change. An actor that
    cannot be placed does not fail: the job waits for it forever. A cluster that may grow
    (autoscaling) keeps the setting, with a warning."""
    need, actors = cpus_needed(cfg, groups, concurrent)
    if not actors or need <= cluster_cpus:
        return cfg.ray.encoder_cpus
    if not fixed_size:
        log.warning("the cluster has %g CPUs now but one tiling task plus the encoder actors "
                    "need %g: the job waits for more nodes (autoscaling) or stalls; lower "
                    "ray.encoder_cpus / models[].actors", cluster_cpus, need)
        return cfg.ray.encoder_cpus
    tiling = need - cfg.ray.encoder_cpus * actors
    per_actor = math.floor((cluster_cpus - tiling) / actors * 100) / 100
    if per_actor < 0.1:
        raise ConfigError(
            f"{actors} encoder actors and a tiling task need {need:g} CPUs but this Ray has "
            f"{cluster_cpus:g}: lower models[].actors, or --set ray.tiling_cpus=0.5 "
            f"--set ray.encoder_cpus={max(0.1, (cluster_cpus - 0.5) / actors):.2f}")
    return per_actor
