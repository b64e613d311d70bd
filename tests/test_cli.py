"""The command line stops bad jobs before any work and explains why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jobkit import DATA, REPO, write_manifest

from pipeline.cli import main


def write(tmp: Path, text: str) -> Path:
    (tmp / "job.yaml").write_text(text)
    return tmp / "job.yaml"


def test_unknown_key_stops_before_work(tmp_path: Path, capsys) -> None:
    job = write(tmp_path, "manifest: m.csv\noutput: out\nmodels:\n  - id: kaiko-vits16\n"
                          "tiling:\n  tile_sise: 256\n")
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert "tiling.tile_sise" in err and "unknown key" in err
    assert not (tmp_path / "out").exists()


def test_missing_weights_stop_before_any_slide(tmp_path: Path, capsys) -> None:
    write_manifest(tmp_path / "m.csv", [{"slide_id": "a", "uri": str(DATA / "tiny-16px.svs")}])
    job = write(tmp_path, "manifest: m.csv\noutput: out\nmodels:\n  - id: uni\n"
                          "    weights: /nowhere/uni.bin\n")
    assert main(["run", str(job)]) == 2
    assert "/nowhere/uni.bin" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_truncated_checkpoint_stops_the_job_in_the_driver(tmp_path: Path, capsys) -> None:
    import ray

    write_manifest(tmp_path / "m.csv", [{"slide_id": "a", "uri": str(DATA / "tiny-16px.svs")}])
    (tmp_path / "uni.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\"")
    job = write(tmp_path, "manifest: m.csv\noutput: out\nmodels:\n  - id: uni\n"
                          f"    weights: {tmp_path / 'uni.safetensors'}\n")
    started = ray.is_initialized()
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert "cannot read checkpoint" in err and "uni.safetensors" in err
    assert "\x1b[" not in err and "ActorDiedError" not in err
    assert ray.is_initialized() == started  # stopped before Ray: no cluster was started
    assert not (tmp_path / "out").exists()


def test_plan_with_overrides(tmp_path: Path, capsys) -> None:
    write_manifest(tmp_path / "m.csv", [
        {"slide_id": "a", "uri": str(DATA / "CMU-1-Small-Region.svs")},
        {"slide_id": "b", "uri": ""}])
    job = write(tmp_path, "manifest: m.csv\noutput: out\nmodels:\n  - id: uni\n")
    assert main(["plan", str(job), "--model", "kaiko-vits16", "--weights", "random",
                 "--set", "tiling.mpp=1.0"]) == 0
    out = capsys.readouterr().out
    assert '"slides_to_process": 1' in out and "empty uri" in out
    assert '"kaiko-vits16": 1' in out


def test_plan_and_models_import_neither_torch_nor_timm(tmp_path: Path) -> None:
    """Validating a job, planning it and listing the models read only the torch-free facts
    (models/specs.py): torch and timm cost seconds to import. Virchow's SwiGLU layers and
    Phikon's LayerNorm(eps) are named, not imported; a slide encoder is looked up too."""
    write_manifest(tmp_path / "m.csv", [
        {"slide_id": "a", "uri": str(DATA / "CMU-1-Small-Region.svs")},
        {"slide_id": "b", "uri": str(DATA / "boxes-generic.tiff"), "mpp": "0.5"}])
    job = write(tmp_path, "manifest: m.csv\noutput: out\nmodels:\n"
                "  - {id: virchow, weights: random}\n  - {id: phikon, weights: random}\n"
                "  - id: gigapath\n    weights: random\n"
                "    slide_encoder: {id: gigapath-slide, weights: random}\n")
    code = ("import json, sys\n"
            "import pipeline\n"
            "from pipeline.cli import main\n"
            "from pipeline.config import load_config\n"
            f"job = {str(job)!r}\n"
            "assert main(['plan', job]) == 0\n"
            "assert pipeline.plan_job(load_config(job)).summary()['slides_to_process'] == 2\n"
            "assert main(['models']) == 0 and main(['models', '--markdown']) == 0\n"
            "heavy = ['torch', 'timm', 'torchvision', 'ray']\n"
            "print('LOADED', json.dumps([m for m in heavy if m in sys.modules]))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert '"gigapath-slide": 2' in proc.stdout and '"virchow": 2' in proc.stdout
    assert "LOADED []" in proc.stdout


def test_console_script_and_module_agree() -> None:
    exe = Path(sys.executable).parent / "wsi-embed"
    a = subprocess.run([str(exe), "models"], capture_output=True, text=True, cwd=REPO)
    b = subprocess.run([sys.executable, "-m", "pipeline", "models"], capture_output=True,
                       text=True, cwd=REPO)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout
    assert "kaiko-vits16" in a.stdout and "uni" in a.stdout


def test_readme_model_table_is_the_registry() -> None:
    from pipeline.models.registry import markdown_table

    text = (REPO / "README.md").read_text()
    section = text.split("<!-- models:start -->\n", 1)[1].split("<!-- models:end -->", 1)[0]
    assert section == markdown_table(), "regenerate: python -m pipeline models --markdown"


def test_readme_choosing_table_is_the_registry(capsys) -> None:
    from pipeline.models.registry import choosing_table, flops_per_tile

    text = (REPO / "README.md").read_text()
    section = text.split("<!-- choosing:start -->\n", 1)[1].split("<!-- choosing:end -->", 1)[0]
    assert section == choosing_table(), "regenerate: python -m pipeline models --choosing"
    assert main(["models", "--choosing"]) == 0 and capsys.readouterr().out == section
    # ViT-S/16 at 224 px: 197 tokens x ~21.7M params x 2 FLOPs, plus attention: ~9.2 GFLOP
    assert 8.5e9 < flops_per_tile("kaiko-vits16") < 9.5e9


def test_compact_command_compacts_a_lake(tmp_path: Path) -> None:
    """`compact` on a lake of one-slide commits leaves one slides file per cohort."""
    import numpy as np
    import pyarrow as pa

    from pipeline.cli import main
    from pipeline.sink import SLIDES, Lake, embedding_array, slides_schema, table_files

    lake = Lake(str(tmp_path))
    schema = slides_schema(2)
    for i in range(5):
        row = {"slide_id": f"s{i}", "work_key": f"k{i}", "cohort": "c"}
        lake.commit_slides("m", pa.Table.from_arrays(
            [embedding_array(np.ones((1, 2))) if f.name == "embedding" else
             pa.array([row.get(f.name)], f.type) for f in schema], schema=schema), False)
    assert len(table_files(lake.delta(SLIDES, "m"))) == 5
    assert main(["compact", str(tmp_path)]) == 0
    assert len(table_files(lake.delta(SLIDES, "m"))) == 1
    assert main(["compact", str(tmp_path), "--vacuum-hours", "0"]) == 0
    assert len(list((tmp_path / "slides" / "m" / "cohort=c").glob("*.parquet"))) == 1


def test_a_run_that_commits_nothing_fails(tmp_path: Path, capsys) -> None:
    """Every uri wrong: error rows for all, status failed, exit 1 (a nightly goes red)."""
    write_manifest(tmp_path / "m.csv", [{"slide_id": f"s{i}", "uri": f"/nowhere/s{i}.svs"}
                                        for i in range(4)])
    job = write(tmp_path, "manifest: m.csv\noutput: out\nmodels:\n  - id: kaiko-vits16\n"
                          "    weights: random\n")
    assert main(["run", str(job)]) == 1
    out = capsys.readouterr().out
    assert '"status": "failed"' in out
    import json

    record = json.loads(next((tmp_path / "out" / "runs").glob("*.json")).read_text())
    assert record["status"] == "failed" and "committed nothing" in record["error"]
    assert record["counts"]["errors"] == 4


def test_a_manifest_without_its_columns_stops_the_job(tmp_path: Path, capsys) -> None:
    (tmp_path / "m.csv").write_text("slideid,url\na,/x.svs\n")
    job = write(tmp_path, "manifest: m.csv\noutput: out\nmodels:\n  - id: kaiko-vits16\n"
                          "    weights: random\n")
    assert main(["plan", str(job)]) == 2
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert "no 'slide_id', 'uri' column" in err and "found: slideid, url" in err
    assert not (tmp_path / "out").exists()


def test_output_inside_rays_working_dir_copy_is_refused(tmp_path: Path) -> None:
    import pytest

    from pipeline.config import ConfigError
    from pipeline.run import check_output_survives

    copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    copy.mkdir(parents=True)
    with pytest.raises(ConfigError, match="temporary copy"):
        check_output_survives(str(copy / "demo-output"), cwd=str(copy))
    check_output_survives(str(tmp_path / "lake"), cwd=str(copy))       # outside: fine
    check_output_survives("s3://bucket/lake", cwd=str(copy))           # object store: fine
    check_output_survives(str(copy / "lake"), cwd=str(tmp_path))       # not a Ray job: fine


def test_rough_edges_get_clear_answers(tmp_path: Path, capsys) -> None:
    import json

    write_manifest(tmp_path / "m.csv", [{"slide_id": "a", "uri": str(DATA / "tiny-16px.svs")}])
    job = write(tmp_path, "manifest: m.csv\noutput: out\nmodels:\n  - id: kaiko-vits16\n"
                          "    weights: random\n  - id: uni\n    weights: random\n")
    assert main(["plan", str(job), "--set", "models.2.batch_size=8"]) == 2
    assert "position 2 does not exist (the list has 2 entries: 0..1)" in capsys.readouterr().err
    # --log-level after the subcommand; the plan says what each model is fed
    assert main(["plan", str(job), "--log-level", "warning", "--set", "tiling.mpp=1.0"]) == 0
    passes = json.loads(capsys.readouterr().out)["tiling_passes"]
    assert [(p["models"], p["tile_px"], p["mpp"]) for p in passes] == \
        [(["kaiko-vits16"], 224, 1.0), (["uni"], 256, 1.0)]
    assert main(["models", "--json"]) == 0
    ids = {m["id"]: m for m in json.loads(capsys.readouterr().out)}
    assert ids["uni"]["dim"] == 1024 and ids["gigapath-slide"]["kind"] == "slide"
    try:
        main(["--version"])
    except SystemExit as done:
        assert done.code == 0
    assert "wsi-embed 0.1.0" in capsys.readouterr().out


def test_run_ids_name_files_safely_and_once(tmp_path: Path, capsys) -> None:
    write_manifest(tmp_path / "m.csv", [{"slide_id": "a", "uri": "/nowhere/a.svs"}])
    job = write(tmp_path, "manifest: m.csv\noutput: out\nmodels:\n  - id: kaiko-vits16\n"
                          "    weights: random\n")
    for bad in ("../../pwned-runid", "a/b", "has space"):
        assert main(["run", str(job), "--run-id", bad]) == 2
        assert "letters, digits" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned-runid.json").exists()
    assert main(["run", str(job), "--run-id", "night-1"]) == 1  # ran: nothing committed
    assert main(["run", str(job), "--run-id", "night-1"]) == 2
    assert "used before on this lake" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == ["night-1.json"]


def test_doctor_checks_this_machine_and_a_job(tmp_path: Path, capsys) -> None:
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("versions", "openslide", "gpu", "ray auth", "hf token"):
        assert f" {name}: " in out, name
    assert "OpenSlide 4." in out and "doctor: 5 checks, 0 failed" in out

    write_manifest(tmp_path / "m.csv", [{"slide_id": "a", "uri": str(DATA / "tiny-16px.svs")}])
    job = write(tmp_path, "manifest: m.csv\noutput: out\nmodels:\n  - id: kaiko-vits16\n"
                          "    weights: random\n")
    assert main(["doctor", str(job)]) == 0
    out = capsys.readouterr().out
    assert "ok   manifest: " in out and "1 slides, 0 bad rows" in out
    assert "ok   slides: 1 of the first 1 slides reachable" in out
    assert "ok   output: " in out and "ok   weights kaiko-vits16: random" in out
    assert not (tmp_path / "out").exists()  # the probe left nothing behind

    write_manifest(tmp_path / "m.csv", [{"slide_id": "a", "uri": str(tmp_path / "gone.svs")}])
    dead = "http://127.0.0.1:9"  # nothing listens there
    assert main(["doctor", str(job), "--set", "output=s3://b/out", "--set",
                 f"storage.endpoint_url={dead}", "--set", "storage.retry_budget_s=0.5"]) == 1
    out = capsys.readouterr().out
    assert "FAIL slides: 0 of the first 1 slides reachable" in out
    assert "FAIL output: " in out and "doctor: " in out


def test_a_bad_ray_address_is_one_clear_line(tmp_path: Path) -> None:
    write_manifest(tmp_path / "m.csv", [{"slide_id": "a", "uri": str(DATA / "tiny-16px.svs")}])
    job = write(tmp_path, "manifest: m.csv\noutput: out\nmodels:\n  - id: bench-null\n"
                          "    weights: random\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(job)],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": "head.example:port"})
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: cannot connect to the Ray cluster at 'head.example:port' "
                          "(from RAY_ADDRESS)") and "unset it" in err
    assert "Traceback" not in proc.stderr
