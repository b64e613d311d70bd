"""Placement (pipeline.placement): encoder actors' GPU and CPU shares fit the cluster, or the job
stops with the settings to change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jobkit import REPO, generated_cohort, job_config, write_job, write_manifest

from pipeline.config import ConfigError, JobConfig, build_config
from pipeline.placement import place
from pipeline.run import run_job


def cfg_of(models: list[dict[str, Any]], **ray: Any) -> JobConfig:
    return build_config({"manifest": "m.csv", "output": "out", "models": models, "ray": ray})


GIGAPATH = {"id": "gigapath", "weights": "random",
            "slide_encoder": {"id": "gigapath-slide", "weights": "random"}}


def test_tile_and_slide_encoder_share_one_gpu() -> None:
    cfg = cfg_of([GIGAPATH])
    p = place(cfg, [["gigapath"]], {"gigapath": True, "gigapath-slide": True}, 1, True)
    assert p.gpus == {"gigapath": 0.75} and p.slide_gpus == {"gigapath-slide": 0.25}
    assert p.gpus["gigapath"] + p.slide_gpus["gigapath-slide"] <= 1


@pytest.mark.parametrize(("actors", "share"), [(7, 1.0), (8, 0.75)])
def test_a_full_pool_leaves_room_for_the_slide_encoder(actors: int, share: float) -> None:
    cfg = cfg_of([{**GIGAPATH, "actors": actors}])
    p = place(cfg, [["gigapath"]], {"gigapath": True, "gigapath-slide": True}, 8, True)
    assert p.gpus == {"gigapath": share}  # 7 actors: the 8th GPU holds the slide encoder


def test_models_of_one_pass_share_a_gpu_instead_of_taking_turns() -> None:
    cfg = cfg_of([{"id": "uni", "weights": "random"}, {"id": "virchow", "weights": "random"}])
    gpu = {"uni": True, "virchow": True}
    assert place(cfg, [["uni", "virchow"]], gpu, 1, True).gpus == {"uni": 0.5, "virchow": 0.5}
    # passes run together share too; passes run one after another each get whole GPUs
    assert place(cfg, [["uni"], ["virchow"]], gpu, 1, True).gpus == {"uni": 0.5, "virchow": 0.5}
    assert place(cfg, [["uni"], ["virchow"]], gpu, 1, False).gpus == {"uni": 1.0, "virchow": 1.0}


def test_too_many_actors_are_refused_with_the_setting_to_change() -> None:
    cfg = cfg_of([{"id": "uni", "weights": "random", "actors": 9}])
    with pytest.raises(ConfigError, match=r"9 GPU encoder actors .* 2 GPUs .* lower "
                       r"models\[\]\.actors to 8 in all"):
        place(cfg, [["uni"]], {"uni": True}, 2, True)
    assert place(cfg, [["uni"]], {"uni": True}, 3, True).gpus == {"uni": 0.3333}


def test_cuda_without_gpus_is_refused() -> None:
    cfg = cfg_of([{"id": "uni", "weights": "random", "device": "cuda"}])
    with pytest.raises(ConfigError, match="asked for a GPU .* the cluster has none"):
        place(cfg, [["uni"]], {"uni": True}, 0, True)


def test_the_slide_encoder_follows_its_own_device() -> None:
    cfg = cfg_of([GIGAPATH])
    cpu_slide = place(cfg, [["gigapath"]], {"gigapath": True, "gigapath-slide": False}, 1, True)
    assert cpu_slide.gpus == {"gigapath": 1.0} and cpu_slide.slide_gpus == {"gigapath-slide": 0}
    cpu_tiles = place(cfg, [["gigapath"]], {"gigapath": False, "gigapath-slide": True}, 1, True)
    assert cpu_tiles.gpus == {"gigapath": 0.0}
    assert cpu_tiles.slide_gpus == {"gigapath-slide": 0.25}


@pytest.mark.slow
def test_a_job_on_a_ray_that_declares_one_gpu_runs_both_models_on_it(tmp_path: Path) -> None:
    """A real local Ray that says it has one GPU (it has none: the actors fall back to CPU,
    placement is what is tested): two GPU models of one pass ask half a GPU each."""
    rows = generated_cohort(tmp_path / "slides", 1, seed=11)  # placement, not throughput
    manifest = write_manifest(tmp_path / "m.csv", rows)
    cfg = job_config(str(manifest), str(tmp_path / "lake"), ["bench-null", "kaiko-vits16"],
                     ray={"num_cpus": 2, "num_gpus": 1, "encoder_cpus": 0.5,
                          "tiling_cpus": 0.5})
    job = write_job(tmp_path / "job.yaml", cfg)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(job)],
                          capture_output=True, text=True, timeout=400, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (record_file,) = (tmp_path / "lake" / "runs").glob("*.json")
    record = json.loads(record_file.read_text())
    assert record["placement"]["gpus_per_actor"] == {"bench-null": 0.5, "kaiko-vits16": 0.5}
    assert record["counts"]["committed"] == {"bench-null": 1, "kaiko-vits16": 1}


@pytest.mark.usefixtures("local_ray")
def test_two_cpu_models_on_two_cores_fit_themselves(tmp_path: Path) -> None:
    """One tiling task (1 CPU) and two CPU encoder actors (1 CPU each) cannot all hold a slot
    on 2 cores: Ray would wait for ever. The job lowers ray.encoder_cpus to fit."""
    rows = generated_cohort(tmp_path / "slides", 1, seed=21)  # any number of slides
    manifest = write_manifest(tmp_path / "m.csv", rows)
    cfg = job_config(str(manifest), str(tmp_path / "lake"), ["bench-null", "kaiko-vits16"])
    for m in cfg.models:
        m.device = "cpu"
    assert cfg.ray.encoder_cpus == 1.0 and cfg.ray.tiling_cpus == 1.0
    record = run_job(cfg)
    assert record["status"] == "succeeded"
    assert record["placement"]["encoder_cpus"] == 0.5
    assert record["counts"]["committed"] == {"bench-null": 1, "kaiko-vits16": 1}


@pytest.mark.usefixtures("local_ray")
def test_more_actors_than_cores_can_hold_are_refused(tmp_path: Path) -> None:
    rows = generated_cohort(tmp_path / "slides", 1, seed=22)
    manifest = write_manifest(tmp_path / "m.csv", rows)
    cfg = job_config(str(manifest), str(tmp_path / "lake"), ["bench-null"])
    cfg.models[0].actors = 12
    cfg.models[0].device = "cpu"
    with pytest.raises(ConfigError, match=r"12 encoder actors .* need 13 CPUs but this Ray "
                       r"has 2: lower models\[\]\.actors, or --set ray.tiling_cpus=0.5 --set "
                       r"ray.encoder_cpus=0.12"):
        run_job(cfg)
