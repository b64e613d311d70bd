"""`python -m pipeline doctor [job.yaml]`: is this machine (and this job) ready to run?

Each check prints one line, ``ok``, ``warn`` or ``FAIL``, with what it found and what to do.
Without a job file it checks the machine: Python and package versions, OpenSlide, GPUs, Ray's
address and token-auth settings, the Hugging Face token. With one it also checks the job:
the config, the manifest (read and parsed), a sample of its slides (reachable), the output
(a probe object written and removed), each model's weights (resolved as a run would, gated
hub repositories included). Exit 1 if anything FAILs; nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import platform
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import JobConfig


@dataclass
class Check:
    status: str  # ok | warn | FAIL
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4} {self.name}: {self.detail}"


def _run(name: str, fn: Callable[[], Check | str]) -> Check:
    try:
        got = fn()
    except Exception as err:  # noqa: BLE001 - a failing check is a report, not a crash
        from pipeline.plan import plain_text

        return Check("FAIL", name, plain_text(f"{type(err).__name__}: {err}")[:600])
    return got if isinstance(got, Check) else Check("ok", name, got)


def machine_checks() -> list[Check]:
    def versions() -> str:
        import pyarrow
        import ray
        import torch

        from pipeline import __version__

        return (f"python {platform.python_version()}, wsi-pipeline {__version__}, ray "
                f"{ray.__version__}, torch {torch.__version__}, pyarrow {pyarrow.__version__}")

    def openslide() -> str:
        import openslide as osl

        return f"OpenSlide {osl.__library_version__} (openslide-python {osl.__version__})"

    def gpus() -> Check:
        import torch

        if not torch.cuda.is_available():
            return Check("warn", "gpu", "no CUDA GPU visible here: encoders run on CPU (slow); "
                         "on a cluster, GPUs of the worker nodes are what counts")
        names = [f"{torch.cuda.get_device_name(i)} (sm{''.join(map(str, torch.cuda.get_device_capability(i)))})"  # noqa: E501
                 for i in range(torch.cuda.device_count())]
        return Check("ok", "gpu", f"{len(names)} visible: {', '.join(names)}; CUDA "
                     f"{torch.version.cuda}")

    def ray_auth() -> Check:
        mode = os.environ.get("RAY_AUTH_MODE", "")
        token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH")
                          or Path.home() / ".ray" / "auth_token")
        has_token = bool(os.environ.get("RAY_AUTH_TOKEN")) or token_file.is_file()
        address = os.environ.get("RAY_ADDRESS") or "unset (runs start an embedded local Ray)"
        detail = (f"RAY_ADDRESS {address}; RAY_AUTH_MODE {mode or 'unset (Ray default)'}; "
                  f"token {'found' if has_token else 'none'}"
                  + (f" ({token_file})" if token_file.is_file() else ""))
        if mode == "token" and not has_token:
            return Check("FAIL", "ray auth", detail + ": token mode needs RAY_AUTH_TOKEN or "
                         "a token file (README 'Ray token authentication')")
        return Check("ok", "ray auth", detail + " (client and cluster must agree: README "
                     "'Ray token authentication')")

    def hf_token() -> Check:
        if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
            return Check("ok", "hf token", "HF_TOKEN is set (gated models need approved access)")
        return Check("warn", "hf token", "HF_TOKEN is not set: gated models (Virchow, UNI, "
                     "CONCH, GigaPath, ...) cannot be fetched from the hub; staged weights "
                     "(weights: /path or s3://...) need none")

    return [_run("versions", versions), _run("openslide", openslide), _run("gpu", gpus),
            _run("ray auth", ray_auth), _run("hf token", hf_token)]


def job_checks(cfg: JobConfig, sample: int = 5) -> list[Check]:
    from pipeline.manifest import read_manifest
    from pipeline.models.specs import get_slide_model
    from pipeline.models.weights import resolve_weights
    from pipeline.storage import atomic_write_bytes, fingerprints, join, url_to_fs, with_retries

    checks: list[Check] = []
    manifest = None

    def read() -> Check:
        nonlocal manifest
        manifest = read_manifest(cfg.manifest, cfg.storage, cfg.default_cohort)
        status = "ok" if manifest.entries else "FAIL"
        return Check(status, "manifest", f"{cfg.manifest}: {len(manifest.entries)} slides, "
                     f"{len(manifest.problems)} bad rows"
                     + (f" (first: row {manifest.problems[0].row}: "
                        f"{manifest.problems[0].reason})" if manifest.problems else ""))

    checks.append(_run("manifest", read))
    if manifest is not None and manifest.entries:
        def slides() -> Check:
            uris = [e.uri for e in manifest.entries[:sample]]
            found = fingerprints(uris, cfg.storage)
            bad = {u: r for u, r in found.items() if isinstance(r, BaseException)}
            detail = f"{len(uris) - len(bad)} of the first {len(uris)} slides reachable"
            if bad:
                u, err = next(iter(bad.items()))
                return Check("FAIL", "slides", f"{detail}; {u}: {type(err).__name__}: {err}")
            return Check("ok", "slides", detail)

        checks.append(_run("slides", slides))

    def output() -> str:
        fs, root = url_to_fs(cfg.output, cfg.storage)
        existed = fs.exists(root)
        probe = join(root, "_doctor", f"probe-{uuid.uuid4().hex}")
        with_retries(lambda: atomic_write_bytes(fs, probe, b"ok"), cfg.storage,
                     what="write a probe")
        with_retries(lambda: fs.rm_file(probe), cfg.storage, what="remove the probe")
        for d in [join(root, "_doctor")] + ([] if existed else [root]):
            with contextlib.suppress(OSError):
                fs.rmdir(d)  # object stores have no folders: nothing to remove there
        return f"{cfg.output}: a probe object was written and removed"

    checks.append(_run("output", output))
    for m in cfg.models:
        checks.append(_run(f"weights {m.id}", lambda m=m: (
            f"{resolve_weights(m, cfg.storage).source}")))
        if m.slide_encoder is not None:
            s = m.slide_encoder
            checks.append(_run(f"weights {s.id}", lambda s=s: resolve_weights(
                s, cfg.storage, spec=get_slide_model(s.id)).source))
    return checks


def doctor(cfg: JobConfig | None) -> tuple[list[Check], int]:
    checks = machine_checks() + (job_checks(cfg) if cfg is not None else [])
    return checks, 1 if any(c.status == "FAIL" for c in checks) else 0
