"""Where a model's parameters come from, checked on the driver and loaded once per actor.

``resolve_weights`` runs before any slide is touched so that a missing file, a gated repo or a
checksum mismatch stops the job in seconds with an actionable message, and so that the exact
weights (``WeightsRef.identity``) can go into the work key: changing weights re-runs work,
re-running with the same weights does not. ``load_model`` then builds the architecture and
loads the parameters strictly on each encoder actor.

Resolving imports neither torch nor timm (planning and ``doctor`` stay fast): torch is
imported where a checkpoint is read or a model built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pipeline.config import ModelConfig, StorageConfig
from pipeline.models import specs
from pipeline.models.specs import SlideModelSpec, TileModelSpec
from pipeline.storage import is_local, url_to_fs, with_retries

if TYPE_CHECKING:
    import torch

    from pipeline.models.registry import StateDict

log = logging.getLogger(__name__)

CHUNK = 8 * 1024 * 1024
CANDIDATE_FILES = ("model.safetensors", "pytorch_model.bin")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SEED_RE = re.compile(r"^random:seed=(\d+)$")


class WeightsError(RuntimeError):
    """Weights cannot be found, fetched, verified or loaded; the message says what to do."""


@dataclass(frozen=True)
class WeightsRef:
    """Resolved weights: where to load them from and the identity that enters the work key."""

    source: str  # "random" | "hub:<repo>@<revision>/<file>" | local path | fsspec URL
    identity: str  # "random:seed=<n>" | "sha256:<hex>" | "hub:<repo>@<rev>/<file>:<etag>" | ...
    sha256: str | None  # checksum of the weights actually used, when known on the driver
    random: bool


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Streaming sha256 of a file (8 MB chunks: constant memory for multi-GB checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def random_seed(model_id: str) -> int:
    """Seed derived from the model id: re-runs give identical 'random' embeddings."""
    return int.from_bytes(hashlib.sha256(f"random:{model_id}".encode()).digest()[:4], "big")


# --- resolve (driver) ------------------------------------------------------------------------


def _local_path(source: str) -> Path:
    parsed = urlparse(source)
    if parsed.scheme.lower() in {"file", "local"}:
        return Path(parsed.netloc + parsed.path).expanduser()
    return Path(source).expanduser()


def _candidates(spec: TileModelSpec) -> list[str]:
    names = [spec.hub_filename] if spec.hub_filename else []
    return names + [n for n in CANDIDATE_FILES if n not in names]


def _check_sha(expected: str | None, actual: str, where: str) -> None:
    if expected and expected.lower() != actual:
        raise WeightsError(
            f"sha256 mismatch for weights {where}: expected {expected.lower()} (models[].sha256), "
            f"file has {actual}; the file is corrupt or a different checkpoint"
        )


def _resolve_local(spec: TileModelSpec, cfg: ModelConfig) -> WeightsRef:
    path = _local_path(cfg.weights)
    if not path.exists():
        raise WeightsError(
            f"{spec.id}: weights file {str(path)!r} not found: stage the file or use weights: hub"
        )
    if path.is_dir():
        found = next((path / n for n in _candidates(spec) if (path / n).is_file()), None)
        if found is None:
            raise WeightsError(
                f"{spec.id}: weights directory {str(path)!r} holds none of "
                f"{', '.join(_candidates(spec))}: stage the file or use weights: hub"
            )
        path = found
    digest = file_sha256(path)
    _check_sha(cfg.sha256, digest, repr(str(path)))
    return WeightsRef(source=str(path.resolve()), identity=f"sha256:{digest}", sha256=digest,
                      random=False)


def _resolve_url(spec: TileModelSpec, cfg: ModelConfig, storage: StorageConfig) -> WeightsRef:
    url = cfg.weights
    try:
        fs, path = url_to_fs(url, storage)
        info = with_retries(lambda: fs.info(path), storage, what=f"stat {url}")
        if info.get("type") == "directory":
            base = url.rstrip("/")
            for name in _candidates(spec):
                if fs.exists(f"{path.rstrip('/')}/{name}"):
                    url = f"{base}/{name}"
                    info = fs.info(f"{path.rstrip('/')}/{name}")
                    break
            else:
                raise WeightsError(
                    f"{spec.id}: weights folder {url!r} holds none of "
                    f"{', '.join(_candidates(spec))}"
                )
    except WeightsError:
        raise
    except FileNotFoundError:
        raise WeightsError(
            f"{spec.id}: weights file {url!r} not found: stage the file or use weights: hub"
        ) from None
    except Exception as err:  # credentials, endpoint, permissions: say which URL and why
        raise WeightsError(f"{spec.id}: cannot read weights {url!r}: {err}") from err
    if cfg.sha256:
        identity = f"sha256:{cfg.sha256}"
    else:
        etag = str(info.get("ETag") or info.get("etag") or info.get("md5") or "").strip('"')
        tag = f"etag={etag}" if etag else f"mtime={info.get('LastModified') or info.get('mtime')}"
        identity = f"url:{url}:{tag}:size={info.get('size')}"
    return WeightsRef(source=url, identity=identity, sha256=cfg.sha256, random=False)


def _hf_cache_dir() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or None  # None: huggingface_hub's default


def _hf_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or bool(constants.HF_HUB_OFFLINE)


def _hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def _hub_ref(repo: str, commit: str, filename: str, etag: str) -> WeightsRef:
    etag = etag.strip('"').removeprefix("W/").strip('"')
    source = f"hub:{repo}@{commit}/{filename}"
    sha = etag if _HEX64.match(etag) else None  # LFS etags are the file's sha256
    return WeightsRef(source=source, identity=f"{source}:{etag}", sha256=sha, random=False)


def _from_hf_cache(repo: str, filename: str, revision: str) -> WeightsRef | None:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo, filename, cache_dir=_hf_cache_dir(), revision=revision)
    if not isinstance(cached, str):
        return None
    snapshot = Path(cached)
    # .../snapshots/<commit>/<filename> -> the blob it links to is named by its etag.
    commit = snapshot.parents[len(Path(filename).parts) - 1].name
    etag = Path(os.path.realpath(snapshot)).name
    return _hub_ref(repo, commit, filename, etag)


def _hub_error(spec: TileModelSpec, repo: str, filename: str, revision: str,
               err: BaseException) -> WeightsError:
    from huggingface_hub import errors

    page = f"https://huggingface.co/{repo}"
    stage = ("stage the file and set weights: /path/to/file or s3://bucket/key, or pre-populate "
             "the Hugging Face cache (hf download on a connected machine, same HF_HOME)")
    what = f"{spec.id}: cannot resolve weights {repo}/{filename}@{revision}"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, errors.GatedRepoError) or status in {401, 403}:
        token = "HF_TOKEN is set but has no access" if _hf_token() else "HF_TOKEN is not set"
        return WeightsError(f"{what}: gated or unauthorised ({token}). Request access at {page}, "
                            f"then set HF_TOKEN to a token of the approved account")
    if isinstance(err, errors.RevisionNotFoundError):
        return WeightsError(f"{what}: revision {revision!r} not found in {page}")
    if isinstance(err, errors.RepositoryNotFoundError):
        return WeightsError(f"{what}: repository not found (or private and HF_TOKEN lacks "
                            f"access); check {page}")
    if isinstance(err, (errors.EntryNotFoundError, errors.RemoteEntryNotFoundError)):
        return WeightsError(f"{what}: file {filename!r} not found in {page}")
    if isinstance(err, errors.OfflineModeIsEnabled) or _hf_offline():
        return WeightsError(f"{what}: HF_HUB_OFFLINE is set and the file is not in the local "
                            f"cache: {stage}")
    return WeightsError(f"{what}: hub unreachable ({type(err).__name__}: {err}); "
                        f"offline or no network? {stage}")


def _resolve_hub(spec: TileModelSpec, cfg: ModelConfig) -> WeightsRef:
    if not spec.hub_repo or not spec.hub_filename:
        raise WeightsError(f"{spec.id}: no hub location in the registry; set weights: /path or URL")
    repo, filename = spec.hub_repo, spec.hub_filename
    revision = cfg.revision or "main"
    if _hf_offline():
        ref = _from_hf_cache(repo, filename, revision)
        if ref is None:
            raise _hub_error(spec, repo, filename, revision, RuntimeError("offline"))
    else:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        try:
            meta = get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision),
                                        token=_hf_token())
            ref = _hub_ref(repo, meta.commit_hash or revision, filename, meta.etag or "")
        except Exception as err:
            status = getattr(getattr(err, "response", None), "status_code", None)
            network = status is None and not isinstance(err, _hf_not_found_errors())
            ref = _from_hf_cache(repo, filename, revision) if network else None
            if ref is None:
                raise _hub_error(spec, repo, filename, revision, err) from err
            log.warning("%s: hub unreachable (%s); using the cached %s", spec.id, err, ref.source)
    if cfg.sha256 and ref.sha256 and cfg.sha256 != ref.sha256:
        _check_sha(cfg.sha256, ref.sha256, ref.source)
    return ref


def _hf_not_found_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors

    return (errors.RepositoryNotFoundError, errors.EntryNotFoundError,
            errors.RevisionNotFoundError, errors.RemoteEntryNotFoundError)


def resolve_weights(model_cfg: ModelConfig | Any, storage: StorageConfig,
                    spec: TileModelSpec | Any = None) -> WeightsRef:
    """Check that the configured weights exist and are readable; pin them to an identity.

    ``spec`` defaults to the tile-model registry entry; slide encoders pass their own spec
    (anything with ``id``, ``hub_repo`` and ``hub_filename``).
    """
    spec = spec or specs.get(model_cfg.id)
    if model_cfg.weights == "random":
        seed = random_seed(spec.id)
        log.warning("%s: using RANDOM weights (seed %d): embeddings are meaningless", spec.id, seed)
        return WeightsRef(source="random", identity=f"random:seed={seed}", sha256=None, random=True)
    if model_cfg.weights == "hub":
        return _resolve_hub(spec, model_cfg)
    if is_local(model_cfg.weights):
        return _resolve_local(spec, model_cfg)
    return _resolve_url(spec, model_cfg, storage)


# --- load (actor) ----------------------------------------------------------------------------


def weights_cache_dir() -> Path:
    """Per-node download cache; WSI_WEIGHTS_CACHE overrides (e.g. a fast local disk)."""
    env = os.environ.get("WSI_WEIGHTS_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "wsi-pipeline" / "weights"


def _fetch_url(ref: WeightsRef, storage: StorageConfig) -> Path:
    key = ref.sha256 or hashlib.sha256(ref.identity.encode()).hexdigest()[:32]
    name = Path(urlparse(ref.source).path).name or "weights"
    target = weights_cache_dir() / key / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fs, path = url_to_fs(ref.source, storage)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".part")
    os.close(fd)
    try:
        log.info("downloading weights %s -> %s", ref.source, target)
        with_retries(lambda: fs.get_file(path, tmp), storage, what=f"download {ref.source}")
        if ref.sha256:
            _check_sha(ref.sha256, file_sha256(tmp), repr(ref.source))
        os.replace(tmp, target)  # atomic: concurrent actors on a node never see a partial file
    except FileNotFoundError:
        raise WeightsError(f"weights {ref.source!r} disappeared since the job started") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _fetch_hub(ref: WeightsRef) -> Path:
    from huggingface_hub import hf_hub_download

    rest = ref.source.removeprefix("hub:")
    repo, _, rev_file = rest.partition("@")
    revision, _, filename = rev_file.partition("/")
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, token=_hf_token(),
                                    cache_dir=_hf_cache_dir()))
    except Exception as err:
        raise WeightsError(f"cannot download {ref.source}: {type(err).__name__}: {err}; "
                           f"request access at https://huggingface.co/{repo} and set HF_TOKEN, "
                           f"or stage the file (weights: /path or s3://...)") from err


def _read_state_dict(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The checkpoint's tensors; on ``meta``, their names and shapes only (nothing read)."""
    import torch

    if path.suffix == ".safetensors":
        if device == "meta":
            with open(path, "rb") as fh:
                shapes = _safetensors_shapes(fh, path.stat().st_size, repr(str(path)))
            return {k: torch.empty(v, device="meta") for k, v in shapes.items()}
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as err:  # noqa: BLE001 - SafetensorError and friends
            raise WeightsError(f"cannot read checkpoint {str(path)!r}: {err}") from err
    else:
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as err:
            raise WeightsError(f"cannot read checkpoint {str(path)!r}: {err}") from err
        if isinstance(state, dict):
            for wrapper in ("state_dict", "model"):
                inner = state.get(wrapper)
                if isinstance(inner, dict) and inner:
                    state = inner
                    break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{str(path)!r} is not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


_SAFETENSORS_MAX_HEADER = 100 << 20


def _safetensors_shapes(fh: Any, size: int, where: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes from a .safetensors header (8-byte length + JSON); the file's size
    must hold every tensor the header places, so a truncated download is caught here."""
    head = fh.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if n < 2 or n > _SAFETENSORS_MAX_HEADER or 8 + n > size:
        raise WeightsError(f"cannot read checkpoint {where}: not a safetensors file, or "
                           f"truncated ({size} bytes)")
    try:
        header = json.loads(fh.read(n))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in tensors.items()}
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise WeightsError(f"cannot read checkpoint {where}: bad safetensors header "
                           f"({type(err).__name__}: {err})") from err
    if 8 + n + end > size:
        raise WeightsError(f"checkpoint {where} is truncated: {size} bytes, its header places "
                           f"tensors up to byte {8 + n + end} (download it again)")
    return shapes


def _driver_copy(model_id: str, ref: WeightsRef, storage: StorageConfig) -> Path | None:
    """The checkpoint as a local file for the driver's check, or None where only the header
    can be read remotely (safetensors at a URL) or nothing can (hub, not yet cached)."""
    if ref.source.startswith("hub:"):
        from huggingface_hub import try_to_load_from_cache

        # hub:<repo>@<commit>/<filename> (see _hub_ref)
        repo, _, rest = ref.source.removeprefix("hub:").partition("@")
        commit, _, filename = rest.partition("/")
        got = try_to_load_from_cache(repo, filename, revision=commit, cache_dir=_hf_cache_dir())
        return Path(got) if isinstance(got, str) else None
    if is_local(ref.source):
        return local_weights_file(model_id, ref, storage)
    if ref.source.endswith(".safetensors"):
        return None
    return _fetch_url(ref, storage)  # the node's weights cache: actors here reuse it


def checkpoint_meta_state(model_id: str, ref: WeightsRef, storage: StorageConfig
                          ) -> tuple[dict[str, torch.Tensor], str] | None:
    """The checkpoint's names and shapes as meta tensors, read without its data: torch files
    through their zip index, safetensors through their header (remote ones by range reads).
    None where the driver cannot see the file (hub, not cached): its actors check it."""
    import torch

    path = _driver_copy(model_id, ref, storage)
    if path is not None:
        return _read_state_dict(path, device="meta"), repr(str(path))
    if ref.source.startswith("hub:"):
        return None
    fs, rpath = url_to_fs(ref.source, storage)
    with fs.open(rpath, "rb", block_size=1 << 20) as fh:
        shapes = _safetensors_shapes(fh, int(fs.size(rpath)), repr(ref.source))
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}, repr(ref.source)


def check_checkpoint(spec: TileModelSpec, ref: WeightsRef, storage: StorageConfig) -> bool:
    """Before Ray starts: the checkpoint opens and its keys and shapes are the architecture's
    (after the family's key adapter), or WeightsError. True if checked, False if it could not
    be seen from the driver."""
    got = checkpoint_meta_state(spec.id, ref, storage)
    if got is None:
        return False
    from pipeline.models import registry
    state, where = got
    model = registry.build(spec, device="meta")
    load_state_dict_strict(spec, model, registry.adapt_checkpoint(spec, state), where)
    return True


def _list(keys: list[str], n: int = 10) -> str:
    more = f", ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_state_dict_strict(spec: TileModelSpec | SlideModelSpec, model: torch.nn.Module,
                           state: dict[str, torch.Tensor], where: str) -> None:
    """Load every parameter or fail with the key differences (a wrong checkpoint is fatal)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        arch = getattr(spec, "timm_name", None) or "the slide encoder"
        parts = [f"{spec.id}: checkpoint {where} does not match {arch} ({spec.family})"]
        if missing:
            parts.append(f"{len(missing)} missing keys: {_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_list(unexpected)}")
        if wrong:
            shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong]
            parts.append(f"{len(wrong)} shape mismatches: {_list(shapes)}")
        raise WeightsError("; ".join(parts))
    model.load_state_dict(state, strict=True, assign=True)


def _has_meta(model: torch.nn.Module) -> bool:
    tensors = list(model.parameters()) + list(model.buffers())
    return any(t.is_meta for t in tensors)


def local_weights_file(model_id: str, ref: WeightsRef, storage: StorageConfig) -> Path:
    """A local copy of resolved (non-random) weights on this node: hub cache, staged or as is."""
    if ref.source.startswith("hub:"):
        return _fetch_hub(ref)
    if is_local(ref.source):
        path = _local_path(ref.source)
        if not path.is_file():
            raise WeightsError(f"{model_id}: weights file {str(path)!r} not found on this node "
                               f"(local paths must be visible to every node): stage the file "
                               f"or use weights: hub")
        if ref.sha256:
            _check_sha(ref.sha256, file_sha256(path), repr(str(path)))
        return path
    return _fetch_url(ref, storage)


def load_model(spec: TileModelSpec, ref: WeightsRef, storage: StorageConfig,
               device: torch.device) -> torch.nn.Module:
    """Build the architecture and load ``ref`` into it; eval mode, on ``device``."""
    from pipeline.models import registry

    return _load(spec, ref, storage, device, registry.build, registry.adapt_checkpoint)


def _load(spec: Any, ref: WeightsRef, storage: StorageConfig, device: torch.device,
          build: Callable[..., torch.nn.Module],
          adapt: Callable[[Any, StateDict], StateDict]) -> torch.nn.Module:
    """One loading procedure for tile and slide encoders (``build``/``adapt`` are theirs)."""
    import torch

    if ref.random:
        match = _SEED_RE.match(ref.identity)
        seed = int(match.group(1)) if match else random_seed(spec.id)
        # fork_rng: deterministic init without disturbing the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build(spec, device="cpu")
    else:
        path = local_weights_file(spec.id, ref, storage)
        # Authors' key layouts (CONCH's visual.*, transformers' Dinov2) -> the built module's.
        state = adapt(spec, _read_state_dict(path))
        # Build on meta and adopt the checkpoint tensors: skips a random init that would be
        # overwritten anyway (seconds for a 1B model). Fall back to a real build if the
        # architecture holds non-persistent buffers that a checkpoint cannot fill.
        model = build(spec, device="meta")
        load_state_dict_strict(spec, model, state, repr(str(path)))
        if _has_meta(model):
            model = build(spec, device="cpu")
            load_state_dict_strict(spec, model, state, repr(str(path)))
        model = model.float()  # fp32 master weights; reduced precision comes from autocast
    return model.eval().to(device)


# --- slide encoders --------------------------------------------------------------------------


def check_slide_checkpoint(spec: SlideModelSpec, ref: WeightsRef, storage: StorageConfig
                           ) -> bool:
    """A slide encoder's checkpoint, checked on the driver like a tile model's (names and
    shapes after the family's adapter, nothing read but the index); False if unseen."""
    got = checkpoint_meta_state(spec.id, ref, storage)
    if got is None:
        return False
    from pipeline.models import registry
    state, where = got
    model = registry.build_slide(spec, device="meta")
    load_state_dict_strict(spec, model, registry.adapt_slide_checkpoint(spec, state), where)
    return True


def load_slide_model(spec: SlideModelSpec, ref: WeightsRef, storage: StorageConfig,
                     device: torch.device) -> torch.nn.Module:
    """Build the slide encoder and load ``ref`` strictly (random: the id's seed); eval mode,
    fp32 master weights, on ``device``."""
    from pipeline.models import registry

    return _load(spec, ref, storage, device, registry.build_slide,
                 registry.adapt_slide_checkpoint)
