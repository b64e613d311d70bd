"""The job config stops bad jobs before any work, naming the field."""

from pathlib import Path

import pytest

from pipeline.config import ConfigError, build_config, load_config

BASE = {"manifest": "s3://bucket/m.csv", "output": "s3://bucket/out",
        "models": [{"id": "kaiko-vits16", "weights": "random"}]}


def test_defaults_and_types() -> None:
    cfg = build_config(BASE)
    # No job-wide mpp/tile size: each model tiles at its own declared field of view.
    assert cfg.tiling.mpp is None and cfg.tiling.tile_size is None
    assert cfg.tiling.for_model(256, 0.5).tile_size == 256
    assert cfg.tiling.model_copy(update={"mpp": 0.25}).for_model(256, 0.5).mpp == 0.25
    assert cfg.models[0].weights == "random"


@pytest.mark.parametrize(("patch", "field"), [
    ({"tiling": {"tile_sise": 256}}, "tiling.tile_sise"),
    ({"tiling": {"mpp": -1}}, "tiling.mpp"),
    ({"tiling": {"min_tissue": 1.5}}, "tiling.min_tissue"),
    ({"output": "ftp://host/out"}, "output"),
    ({"manifest": "s3:///m.csv"}, "manifest"),
    ({"models": [{"id": "no-such-model"}]}, "models.0.id"),
    ({"models": []}, "models"),
    ({"models": [{"id": "kaiko-vits16", "sha256": "abc"}]}, "models.0.sha256"),
    ({"storage": {"endpoint_url": "localhost:9000"}}, "storage.endpoint_url"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_values_name_the_field(patch: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config({**BASE, **patch})
    assert f"  {field}:" in str(err.value)


def test_duplicate_models_rejected() -> None:
    with pytest.raises(ConfigError, match="kaiko-vits16 listed more than once"):
        build_config({**BASE, "models": [{"id": "kaiko-vits16"}, {"id": "kaiko-vits16"}]})


def test_cli_overrides_win_over_yaml(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("manifest: m.csv\noutput: out\nmodels:\n  - id: kaiko-vits16\n"
                   "    weights: random\ntiling:\n  mpp: 0.5\n")
    cfg = load_config(job, {"tiling.mpp": 0.25, "models.0.batch_size": 8,
                            "output": "s3://b/x"})
    assert cfg.tiling.mpp == 0.25
    assert cfg.models[0].batch_size == 8
    assert cfg.output == "s3://b/x"
    # relative paths in the file are relative to the file
    assert cfg.manifest == str(tmp_path / "m.csv")


def test_missing_or_broken_job_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("manifest: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_tiling_hash_ignores_chunking_only() -> None:
    a = build_config(BASE).tiling.for_model(224, 0.5)
    assert a.spec_hash() == a.model_copy(update={"chunk_tiles": 7, "threads": 2}).spec_hash()
    assert a.spec_hash() != a.model_copy(update={"mpp": 0.25}).spec_hash()
