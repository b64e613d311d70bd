"""Typed job configuration: YAML file + CLI overrides, validated before any work starts.

Every section forbids unknown keys so that a typo (``tile_sise``) stops the job with a message
naming the field instead of silently running with a default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

KNOWN_SCHEMES = {"", "file", "local", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory",
                 "http", "https", "hf"}


class ConfigError(ValueError):
    """A job configuration that cannot run; the message names the offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_url(value: str, field: str) -> str:
    if not value or not value.strip():
        raise ValueError(f"{field} must not be empty")
    scheme = urlparse(value).scheme.lower()
    # Windows drive letters parse as a one-letter scheme; treat them as local paths.
    if len(scheme) > 1 and scheme not in KNOWN_SCHEMES:
        raise ValueError(f"{field}: unsupported URL scheme {scheme!r} in {value!r} "
                         f"(use a local path or one of s3://, gs://, az://, memory://)")
    if scheme in {"s3", "s3a", "gs", "gcs"} and not urlparse(value).netloc:
        raise ValueError(f"{field}: {value!r} has no bucket name")
    return value


class TilingConfig(_Strict):
    """Where tiles come from: physical resolution, size and tissue filter."""

    mpp: float | None = Field(
        None, gt=0.05, le=64,
        description="target microns per pixel for every model; None: each model's own")
    tile_size: int | None = Field(
        None, ge=16, le=4096,
        description="tile edge in pixels at target mpp for every model; None: each model's own")
    min_tissue: float = Field(0.25, ge=0.0, le=1.0,
                              description="minimum tissue fraction of a tile to keep it")
    tissue_colours: Literal["stains", "any"] = Field(
        "stains", description="stains: tissue is coloured like H&E or DAB, and green, cyan "
        "and blue are marker ink; any: every hue is stain and nothing is ink (trichrome, "
        "alcian blue, red chromogens)")
    chunk_tiles: int = Field(64, ge=1, le=4096,
                             description="tiles per chunk travelling from tiling to encoders")
    thumbnail_px_per_tile: int = Field(
        8, ge=1, le=64, description="tissue-mask resolution: mask pixels per tile edge")
    region_tiles: int = Field(8, ge=1, le=64,
                              description="tiles per edge of one region read from the slide")
    reader: Literal["auto", "openslide", "tiff"] = Field(
        "auto", description="auto: decode JPEG tiles directly where a fast reader recognises "
        "the file (pipeline.readers), OpenSlide otherwise; openslide: always OpenSlide; "
        "tiff: a fast reader or fail")
    threads: int = Field(1, ge=1, le=64, description="decode threads per tiling task")
    dct_downscale: bool = Field(
        True, description="fast TIFF path: halve (or quarter) JPEG tiles inside libjpeg-turbo's "
        "IDCT instead of decoding in full and box-averaging (~2x faster tiling of 40x slides; "
        "pixels differ by ~1 level on average, see pipeline/readers/tiff.py)")
    mpp_tolerance: float = Field(
        0.02, ge=0, le=0.5, description="relative mpp difference treated as 'exactly the target'")
    previews: bool = Field(
        True, description="write each slide's preview (thumbnail with tissue contour and kept "
        "tiles, JPEG) and its GeoJSON for QuPath to OUT/previews/")
    qc: bool = Field(
        True, description="record per-tile QC values (glass and pen-ink fractions) in the "
        "tiles table (~2-3% of tiling time, bench/tiling.py --qc); recorded, never used to "
        "drop tiles")
    qc_sharpness: bool = Field(
        False, description="also record each tile's sharpness (variance of the Laplacian; "
        "~9-12% more tiling time, bench/tiling.py --qc); needs qc")
    max_damaged_fraction: float = Field(
        0.01, ge=0.0, le=1.0, description="fraction of a slide's tiles that may lie on damaged "
        "JPEG tiles (delivered white, listed in the slides row) before the slide fails with "
        "stage read; 0: any damaged tile fails it")

    def for_model(self, tile_px: int, mpp: float) -> TilingConfig:
        """Concrete settings for a model that declares (tile_px, mpp); job values win."""
        return self.model_copy(update={"tile_size": self.tile_size or tile_px,
                                       "mpp": self.mpp or mpp})

    def spec_hash(self) -> str:
        """Hash of everything that changes which pixels a tile holds (not chunking)."""
        keep = self.model_dump(exclude={"chunk_tiles", "region_tiles", "reader", "threads",
                                        "previews", "qc", "qc_sharpness",
                                        "max_damaged_fraction"})
        # dct_downscale changes pixels (slightly): it stays in the hash
        keep["algorithm"] = TILING_ALGORITHM_VERSION
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


# 2: whole-number downsampling by box averaging; near-whole scales read k x the level's mpp.
# 3: the tissue mask measured against ground truth (bench/tissue.py): white-balanced chroma on
#    the stain hues instead of Otsu on HSV saturation; marker ink, dust, borders and the
#    cover-slip edge excluded, faint tissue and fat kept. It changes which tiles slides keep.
TILING_ALGORITHM_VERSION = 3


def _check_weights(v: str) -> str:
    if v in {"hub", "random"}:
        return v
    return _check_url(v, "weights")


def _check_sha(v: str | None) -> str | None:
    if v is not None and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v.lower())):
        raise ValueError("sha256 must be 64 hex digits")
    return v.lower() if v else v


class SlideEncoderConfig(_Strict):
    """A slide encoder fed by this tile model's embeddings (e.g. Prov-GigaPath's LongNet)."""

    id: str = "gigapath-slide"
    weights: str = Field("hub", description="as for tile models: hub, random, path or URL")
    revision: str | None = None
    sha256: str | None = None
    layers: list[int] = Field(default_factory=list,
                              description="extra layers to output besides the last, e.g. [11]")
    global_pool: bool = Field(True, description="gigapath-slide: mean of tile tokens (the "
                              "authors' advice) instead of the untrained CLS token")
    positions: Literal["level0/256", "level0/tile"] | None = Field(
        None, description="gigapath-slide: how level-0 tile coordinates become grid "
        "positions. level0/256 (default, the authors' coords_to_pos): px // 256 whatever the "
        "tile size or scan, so on a 40x scan neighbouring tiles are 2 positions apart; "
        "level0/tile: px / the tile's level-0 size, neighbours 1 apart (as TRIDENT and "
        "slide2vec feed it). Recorded in every slide row's aggregation")
    device: Literal["auto", "cuda", "cpu"] = "auto"

    _weights = field_validator("weights")(classmethod(lambda cls, v: _check_weights(v)))
    _sha = field_validator("sha256")(classmethod(lambda cls, v: _check_sha(v)))

    @field_validator("id")
    @classmethod
    def _known(cls, v: str) -> str:
        from pipeline.models.specs import SLIDE_MODELS  # torch-free: validation stays fast

        if v not in SLIDE_MODELS:
            raise ValueError(f"unknown slide encoder {v!r}; known: {', '.join(SLIDE_MODELS)}")
        return v

    @model_validator(mode="after")
    def _fits_the_encoder(self) -> SlideEncoderConfig:
        """Settings only some encoders have are refused elsewhere, not silently ignored."""
        from pipeline.models.specs import get_slide_model

        spec = get_slide_model(self.id)
        if self.layers and not spec.per_layer:
            raise ValueError(f"layers: {spec.id} outputs its final embedding only (layer "
                             f"{spec.depth}); per-layer outputs are gigapath-slide's")
        if not spec.per_layer and "global_pool" in self.model_fields_set:
            raise ValueError(f"global_pool: {spec.id} reads out by {spec.readout}; "
                             f"global_pool is gigapath-slide's")
        allowed = {spec.positions, *spec.other_positions} - {None}
        if self.positions is not None and self.positions not in allowed:
            what = (f"uses {spec.positions} only" if allowed
                    else "does not use tile positions")
            raise ValueError(f"positions: {spec.id} {what}")
        return self


class ModelConfig(_Strict):
    """One tile encoder to run. ``weights`` says where its parameters come from."""

    id: str = Field(description="registry id, see `python -m pipeline models`")
    weights: str = Field(
        "hub",
        description="'hub' (Hugging Face repo of the registry entry, needs HF_TOKEN for gated "
        "models), 'random' (untrained, for smoke tests only), a local file/dir, or an fsspec URL",
    )
    revision: str | None = Field(None, description="hub revision (commit, tag or branch)")
    sha256: str | None = Field(None, description="expected sha256 of the weights file")
    batch_size: int = Field(64, ge=1, le=8192)
    micro_batch: int | None = Field(
        None, ge=1, le=8192, description="CUDA: tiles per forward inside a batch, whose copies "
        "overlap the previous forward; None: about a quarter of the batch (>= 32)")
    actors: int = Field(1, ge=1, le=1024, description="encoder actors for this model")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    tf32: bool = Field(False, description="fp32 models on CUDA (CONCH, Phikon-v2): TF32 "
                       "matmuls (faster, ~1e-3 relative error); off as their authors ran them; "
                       "recorded as precision 'fp32+tf32'")
    slide_encoder: SlideEncoderConfig | None = Field(
        None, description="also run a slide encoder on each slide's tile embeddings")

    _weights = field_validator("weights")(classmethod(lambda cls, v: _check_weights(v)))
    _sha = field_validator("sha256")(classmethod(lambda cls, v: _check_sha(v)))

    @model_validator(mode="after")
    def _slide_encoder_input(self) -> ModelConfig:
        if self.slide_encoder is not None:
            from pipeline.models.specs import get_slide_model

            spec = get_slide_model(self.slide_encoder.id)
            if spec.input_model != self.id:
                raise ValueError(f"slide encoder {spec.id} reads {spec.input_model} tile "
                                 f"embeddings; attach it to model {spec.input_model}")
        return self

    @field_validator("id")
    @classmethod
    def _known(cls, v: str) -> str:
        from pipeline.models.specs import MODELS  # torch-free: validation stays fast

        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}; known: {', '.join(sorted(MODELS))}")
        return v


class StorageConfig(_Strict):
    """Object-storage access. Credentials come from the usual environment/profile chain."""

    endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, moto, on-prem)")
    region: str | None = None
    anon: bool = False
    profile: str | None = None
    scratch_dir: str | None = Field(None, description="local dir for staged slides (default: tmp)")
    # Every *_gb setting is in GiB (2**30 bytes), as Ray and Kubernetes count memory.
    scratch_limit_gb: float = Field(50.0, gt=0, description="GiB of staged slides per node")
    retries: int = Field(40, ge=0, le=1000,
                         description="most retries of one storage call on transient errors")
    retry_budget_s: float = Field(
        300.0, ge=0, description="time one storage call (a read, a write, a commit) may spend "
        "retrying throttling, 5xx, resets and outages before its slide fails")
    retry_max_backoff_s: float = Field(15.0, gt=0, description="longest wait between retries")
    range_reads: bool = Field(
        True, description="read Aperio .svs and tiled .tif/.tiff slides in object storage (s3, "
        "gs, az) by ranged GETs of their directory and of the tiles under tissue instead of "
        "downloading them whole (pipeline.remote); slides the direct TIFF reader does not take "
        "are staged whole as before. The slides row's read_note says which way was used")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and urlparse(v).scheme not in {"http", "https"}:
            raise ValueError(f"endpoint_url must be http(s)://host[:port], got {v!r}")
        return v

    def fsspec_options(self, protocol: str) -> dict[str, Any]:
        """Keyword arguments for ``fsspec.filesystem(protocol, ...)``."""
        if protocol not in {"s3", "s3a"}:
            return {}
        opts: dict[str, Any] = {"anon": self.anon}
        client: dict[str, Any] = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        if client:
            opts["client_kwargs"] = client
        if self.profile:
            opts["profile"] = self.profile
        # One request per attempt: pipeline.storage.with_retries owns retries and their
        # budget. s3fs's and botocore's own loops (5 tries each, nested) took 48 s on one
        # throttled PUT, whatever retry_budget_s said (s3fs's is set in url_to_fs).
        opts["config_kwargs"] = {"retries": {"max_attempts": 1, "mode": "standard"}}
        return opts


class RayConfig(_Strict):
    """How the job maps onto Ray. Defaults suit a laptop and scale by configuration only."""

    address: str | None = Field(None, description="cluster address; None: RAY_ADDRESS or local")
    tiling_cpus: float = Field(1.0, gt=0, le=64, description="CPUs per tiling task")
    tiling_concurrency: int | None = Field(None, ge=1, description="max parallel tiling tasks")
    encoder_cpus: float = Field(1.0, ge=0, le=64, description="CPUs per encoder actor (a CPU "
                                "encoder runs this many threads, rounded up)")
    tiler_resource: str | None = Field(None, description="custom resource tiling tasks require")
    encoder_resource: str | None = Field(None, description="custom resource encoders require")
    object_store_budget_gb: float | None = Field(
        None, gt=0, description="GiB bound on tiles in flight in the object store; tiling waits "
        "(Ray Data backpressure) when encoders fall behind. None: Ray Data's default share")
    object_store_memory_gb: float | None = Field(None, gt=0,
                                                 description="local Ray only: its GiB")
    num_cpus: int | None = Field(None, ge=1, description="local Ray only: CPUs to use")
    num_gpus: int | None = Field(None, ge=0, description="local Ray only: GPUs to declare "
                                 "(default: those Ray detects)")
    slide_encoder_gpus: float = Field(
        0.25, gt=0, le=1, description="GPU fraction a slide-encoder actor asks (it runs "
        "briefly once per slide); tile encoders leave room for it (pipeline.placement)")
    max_actors_per_gpu: int = Field(
        4, ge=1, le=64, description="most encoder actors that may share one GPU when more "
        "must run at once than there are GPUs; beyond it the job stops before any work")
    actor_start_failures: int = Field(
        2, ge=0, le=100, description="encoder actors of one pool that may fail to start in a "
        "row (a node's transient fault) before the job stops; a model broken for good fails "
        "at every start, so the bound ends the job instead of retrying forever")


class SinkConfig(_Strict):
    """The lake writers and commits (pipeline.sink, pipeline.writer)."""

    writers: int = Field(2, ge=1, le=1024, description="writer actors per tiling pass: tile "
                         "embeddings go from the encoders to these, never to the driver")
    writer_resource: str | None = Field(None, description="custom resource writers require")
    embedding_dtype: Literal["float32", "float16"] = Field(
        "float32", description="stored embedding type; float32 is read by every client "
        "(Spark cannot read Parquet FLOAT16), float16 halves the bytes")
    commit_seconds: float = Field(2.0, gt=0, description="commit written slides at least this "
                                  "often (one Delta transaction per table and model)")
    commit_slides: int = Field(64, ge=1, description="... or as soon as this many are written")
    compact: bool = Field(True, description="compact the slides and errors tables at job end")
    report: bool = Field(True, description="write the run's HTML report to "
                         "OUT/reports/<run_id>.html at job end (python -m pipeline report)")
    lease_wait_s: float = Field(0.0, ge=0, description="how long a job waits for another "
                                "job's lease on the same lake before it gives up")
    lease_ttl_s: float = Field(120.0, gt=0, description="a lease not renewed this long "
                               "belongs to a dead job and may be taken over")
    unsaved_dir: str | None = Field(
        None, description="local folder for error rows and run records that storage refused "
        "at the end of a run (default ~/.local/state/wsi-pipeline/unsaved); the next run on "
        "the lake from this machine writes them")


class JobConfig(_Strict):
    manifest: str = Field(description="CSV or Parquet manifest at any fsspec URL")
    output: str = Field(description="root of the output lake at any fsspec URL")
    models: list[ModelConfig] = Field(min_length=1)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    sink: SinkConfig = Field(default_factory=SinkConfig)
    default_cohort: str = Field("default", min_length=1)
    mean_pool: bool = True
    errors_flush_seconds: float = Field(30.0, gt=0)
    progress_seconds: float = Field(
        30.0, gt=0, description="log a progress line and update the run record's progress "
        "(committed / planned, tiles/s, ETA) this often")
    max_failed_fraction: float = Field(
        1.0, ge=0.0, le=1.0, description="the run fails (exit 1) when more than this fraction "
        "of the slides it had to process failed; at 1.0 only a run that committed nothing fails")

    @field_validator("manifest", "output")
    @classmethod
    def _urls(cls, v: str, info: Any) -> str:
        return _check_url(v, info.field_name)

    @model_validator(mode="after")
    def _unique_models(self) -> JobConfig:
        ids = [m.id for m in self.models]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"models: {', '.join(dup)} listed more than once")
        return self

    @model_validator(mode="after")
    def _slide_encoder_tiles(self) -> JobConfig:
        """A slide encoder reads the tile features its authors trained it on: the same tile
        model (ModelConfig) at the same tile size and resolution (here, as the job tiles)."""
        from pipeline.models import specs

        for i, m in enumerate(self.models):
            if m.slide_encoder is None:
                continue
            s = specs.get_slide_model(m.slide_encoder.id)
            t = self.tiling.for_model(*specs.tiling_spec(specs.get(m.id)))
            assert t.tile_size is not None and t.mpp is not None
            if t.tile_size != s.tile_px or abs(t.mpp - s.mpp) > 1e-9 * s.mpp:
                mag = f" ({s.magnification})" if s.magnification else ""
                raise ValueError(
                    f"models.{i}.slide_encoder: {s.id} was trained on {s.input_model} features "
                    f"of {s.tile_px} px tiles at {s.mpp:g} mpp{mag}; this job tiles {m.id} at "
                    f"{t.tile_size} px and {t.mpp:g} mpp: set tiling.tile_size: {s.tile_px} and "
                    f"tiling.mpp: {s.mpp:g} (they apply to every model of the job)")
        return self


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[_index(node, key, dotted)]
            continue
        if key not in node or node[key] is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[: i + 1])} is not a section")
    last = keys[-1]
    if isinstance(node, list):
        node[_index(node, last, dotted)] = value
    else:
        node[last] = value


def _index(items: list[Any], key: str, dotted: str) -> int:
    """A list position named in ``--set``, checked so a typo is a message, not a traceback."""
    try:
        i = int(key)
    except ValueError:
        raise ConfigError(f"--set {dotted}: {key!r} must be a list position (0, 1, ...)") from None
    if not 0 <= i < len(items):
        raise ConfigError(f"--set {dotted}: position {i} does not exist (the list has "
                          f"{len(items)} entr{'y' if len(items) == 1 else 'ies'}: 0"
                          f"{f'..{len(items) - 1}' if len(items) > 1 else ''})")
    return i


def parse_override(item: str) -> tuple[str, Any]:
    """``tiling.mpp=0.25`` -> ("tiling.mpp", 0.25); values are parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw else ""


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see README 'Job file')"
        lines.append(f"  {where}: {msg}")
    return "invalid job config:\n" + "\n".join(lines)


def build_config(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> JobConfig:
    data = json.loads(json.dumps(data or {}))  # deep copy, plain types
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Read a YAML job file (local path) and apply dotted overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"job file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"job file {str(path)!r} must be a mapping of fields")
    base = path.parent.resolve()
    for key in ("manifest", "output"):
        # Relative local paths in a job file are relative to the file, like most tools do.
        value = data.get(key)
        if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
            data[key] = str(base / value)
    return build_config(data, overrides)
