"""Range reads vs staging of a slide in object storage, side by side in one run.

    .venv/bin/python bench/range_reads.py            # generates bench/data/40x_20k.svs first

moto's S3 server behind tests/faultproxy.py on 127.0.0.1, which adds ``--delay-ms`` per request
(20 ms) and caps all replies together at ``--mbps`` (100 MB/s). Per run, one slide through what
the tiling stage does (``pipeline.remote.slide_bytes`` + ``tile_slide`` + the fingerprint check
after the last tile), one decode thread: bytes fetched / file size (counted by the proxy), time
to the first chunk of tiles, wall seconds and tiles per CPU-second of this process ("per core":
the HTTP client's CPU counts too), staged (``storage.range_reads=false``) and range reads
interleaved. Two proxy modes:

- ``s3like``: ranged GETs answered by the proxy from its copy of the object (``range_cache``):
  constant cost per GET as on S3;
- ``moto``: every GET forwarded to moto, which copies the whole object per GET under a
  per-object lock (~60 ms for 48 MB here), so ranged GETs of one object are serialised there.

Writes bench/results/range_reads.json and range_reads.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
for _k, _v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_k, _v)

import boto3  # noqa: E402
from benchkit import RESULTS, cpu_model  # noqa: E402
from generate import ensure  # noqa: E402
from lake_fixtures import FaultProxy, serve  # noqa: E402

from pipeline.config import StorageConfig, TilingConfig  # noqa: E402
from pipeline.remote import slide_bytes, stats  # noqa: E402
from pipeline.tiling import tile_slide  # noqa: E402


def one(uri: str, storage: StorageConfig, cfg: TilingConfig, proxy: FaultProxy
        ) -> dict[str, Any]:
    """One slide as the tiling stage reads it; the proxy's counters reset first."""
    spec = dict(proxy.last)
    proxy.set(**spec)
    t0, c0 = time.perf_counter(), time.process_time()
    first = None
    n = 0
    with slide_bytes(uri, storage, None, cfg) as got:
        opened = time.perf_counter() - t0
        plan, chunks = tile_slide(got.path, mpp_override=None, cfg=cfg, source=got.source)
        with chunks:
            for c in chunks:
                if first is None:
                    first = time.perf_counter() - t0
                n += len(c.tiles)
            reader = chunks.reader
        got.verify()
        note = got.read_note(None)
        st = stats(got)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rep = proxy.report()
    assert n == plan.num_tiles
    return {"tiles": n, "reader": reader, "wall_s": wall, "cpu_s": cpu, "open_s": opened,
            "first_tile_s": first, "tiles_per_s": n / wall, "tiles_per_cpu_s": n / cpu,
            "bytes": rep["bytes_out"], "requests": rep["requests"], "note": note, **{
                f"source_{k}": v for k, v in st.items() if k != "ranged"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", default="40x_20k")
    ap.add_argument("--delay-ms", type=float, default=20.0)
    ap.add_argument("--mbps", type=float, default=100.0, help="MB/s (1e6 bytes) of all replies")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", nargs="*", default=["s3like", "moto"])
    ap.add_argument("--moto-repeats", type=int, default=1,
                    help="repeats in moto mode (each ranged run takes ~20 s there)")
    args = ap.parse_args()
    path = ensure(args.slide)
    size = path.stat().st_size
    server, port = serve(["s3server.py"], "the S3 server")
    proxy = FaultProxy(f"http://127.0.0.1:{port}")
    out: dict[str, Any] = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                                       "loadavg_start": os.getloadavg()},
                           "slide": args.slide, "file_bytes": size, "delay_ms": args.delay_ms,
                           "mbps": args.mbps, "modes": {}}
    try:
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        s3.create_bucket(Bucket="bench")
        s3.upload_file(str(path), "bench", f"{args.slide}.svs")  # straight to moto
        uri = f"s3://bench/{args.slide}.svs"
        cfg = TilingConfig(mpp=0.5, tile_size=224, threads=1)
        scratch = str(ROOT / "bench" / "data" / "scratch")
        for mode in args.modes:
            link = {"delay_s": args.delay_ms / 1e3, "bytes_per_s": args.mbps * 1e6,
                    "range_cache": mode == "s3like"}
            proxy.last = link  # type: ignore[attr-defined]
            runs: dict[str, list[dict[str, Any]]] = {"staged": [], "ranged": []}
            repeats = args.repeats if mode == "s3like" else args.moto_repeats
            for _ in range(repeats):  # interleaved: load spikes hit both alike
                for way in ("staged", "ranged"):
                    storage = StorageConfig(endpoint_url=proxy.url, scratch_dir=scratch,
                                            range_reads=way == "ranged")
                    r = one(uri, storage, cfg, proxy)
                    runs[way].append(r)
                    print(f"{mode:7s} {way:7s} {r['tiles']} tiles {r['wall_s']:6.2f} s wall, "
                          f"first tile {r['first_tile_s']:5.2f} s, "
                          f"{r['tiles_per_cpu_s']:6.0f} tiles/CPU-s, "
                          f"{r['bytes'] / size:5.1%} of the file in {r['requests']} requests",
                          flush=True)
            best = {w: max(v, key=lambda r: r["tiles_per_cpu_s"]) for w, v in runs.items()}
            fastest = {w: min(v, key=lambda r: r["wall_s"]) for w, v in runs.items()}
            med = {w: {k: float(np.median([r[k] for r in v]))
                       for k in ("wall_s", "first_tile_s", "tiles_per_cpu_s", "tiles_per_s",
                                 "bytes", "requests")} for w, v in runs.items()}
            out["modes"][mode] = {
                "link": link, "runs": runs, "median": med,
                "ratios": {
                    "bytes_over_file_ranged": med["ranged"]["bytes"] / size,
                    "bytes_over_file_staged": med["staged"]["bytes"] / size,
                    "per_core_ranged_over_staged_best": (best["ranged"]["tiles_per_cpu_s"]
                                                         / best["staged"]["tiles_per_cpu_s"]),
                    "wall_rate_ranged_over_staged_best": (fastest["staged"]["wall_s"]
                                                          / fastest["ranged"]["wall_s"]),
                    "first_tile_ranged_over_staged_median": (
                        med["ranged"]["first_tile_s"] / med["staged"]["first_tile_s"]),
                }}
            print(mode, {k: round(v, 3) for k, v in out["modes"][mode]["ratios"].items()},
                  flush=True)
    finally:
        proxy.close()
        server.terminate()
        server.wait(timeout=30)
    out["machine"]["loadavg_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "range_reads.json").write_text(json.dumps(out, indent=1, default=float) + "\n")
    (RESULTS / "range_reads.md").write_text(table(out))
    print(f"wrote {RESULTS / 'range_reads.json'} and range_reads.md")


def table(out: dict[str, Any]) -> str:
    """The results as a Markdown table (medians of the runs; ratios ranged / staged)."""
    lines = [f"Range reads vs staging: {out['slide']} ({out['file_bytes'] / 1e6:.1f} MB), "
             f"{out['delay_ms']:g} ms per request, {out['mbps']:g} MB/s, one decode thread, "
             f"{out['machine']['cpu']} ({out['machine']['cores']} cores, shared).", "",
             "| proxy mode | way | bytes / file | requests | first tile s | wall s | "
             "tiles/CPU-s |", "|---|---|---|---|---|---|---|"]
    for mode, m in out["modes"].items():
        for way in ("staged", "ranged"):
            r = m["median"][way]
            lines.append(f"| {mode} | {way} | {r['bytes'] / out['file_bytes']:.2f} | "
                         f"{r['requests']:.0f} | {r['first_tile_s']:.2f} | {r['wall_s']:.2f} | "
                         f"{r['tiles_per_cpu_s']:.0f} |")
        q = m["ratios"]
        lines.append(f"| {mode} | ranged/staged | {q['bytes_over_file_ranged']:.2f} | | "
                     f"{q['first_tile_ranged_over_staged_median']:.2f}x | "
                     f"{q['wall_rate_ranged_over_staged_best']:.2f}x rate | "
                     f"{q['per_core_ranged_over_staged_best']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
