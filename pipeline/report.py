"""`python -m pipeline report OUT [--run RUN_ID]`: one self-contained HTML page per run.

A person checking a night's run wants one file to open (or attach to a ticket) that answers:
did it do its work, how fast, what failed and why, and do the tiles and embeddings look
right. The page is built only from the lake (run record, slides/errors/tiles tables, preview
images), so it can be written for any past run, on any machine that reads the lake. It loads
nothing from the network: plots and images are inline data: URIs, styles are inline.
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow.dataset as pads

from pipeline.config import StorageConfig
from pipeline.sink import EMBEDDING, SLIDES, TILES, Lake, read_errors, tiles_dataset
from pipeline.storage import atomic_write_bytes, join, url_to_fs

REPORTS = "reports"
RUNS_HINT = "runs/<run_id>.json"
MAX_PREVIEWS = 60          # contact sheet: previews shown (a note says how many were left out)
PREVIEW_PX = 240           # contact sheet: longest side of a thumbnail
PCA_MIN_TILES = 4          # PCA maps only for slides with at least this many tiles
PCA_MAX_TILES = 50_000     # PCA maps only for slides up to this many tiles (memory, time)
PCA_FIT_ROWS = 10_000      # the components are fitted on at most this many tiles
PCA_PX = 320               # PCA map: longest side, nearest-neighbour upscaled to about this
MAX_ERROR_GROUPS = 60
SLOWEST = 15
_BIN_WIDTHS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400)


class ReportError(Exception):
    """The report cannot be written: not a lake, or no such run (the message says which)."""


# ---- reading the lake ----------------------------------------------------------------------


def _run_ids(lake: Lake) -> list[str]:
    return [str(e["name"]).rstrip("/").rsplit("/", 1)[-1][: -len(".json")]
            for e in lake.run_records()]


def _open_run(lake: Lake, run_id: str | None) -> dict[str, Any]:
    runs = _run_ids(lake)
    if not runs:
        if not lake.fs.exists(lake.root):
            raise ReportError(f"no lake at {lake.url}: the path does not exist")
        raise ReportError(f"{lake.url} is not a lake with run records (no {RUNS_HINT}): "
                          "pass the job's output: root")
    if run_id is None:
        run_id = runs[-1]
    elif run_id not in runs:
        shown = ", ".join(runs[-20:]) + (f" (and {len(runs) - 20} older)" if len(runs) > 20
                                         else "")
        raise ReportError(f"no run {run_id!r} in {lake.url}; runs present: {shown}")
    return lake.read_run(run_id)


def _rows(lake: Lake, table: str, model: str | None, wanted: list[str],
          run_id: str | None) -> list[dict[str, Any]]:
    """Rows of one table's snapshot, only the ``wanted`` columns it has (older lakes lack
    some, e.g. preview_path), filtered to one run."""
    dt = lake.delta(table, model)
    if dt is None:
        return []
    ds = dt.to_pyarrow_dataset()
    cols = [c for c in wanted if c in ds.schema.names]
    flt = pads.field("run_id") == run_id if run_id and "run_id" in ds.schema.names else None
    return ds.to_table(columns=cols, filter=flt).to_pylist()


def _timings(record: dict[str, Any]) -> list[dict[str, Any]]:
    t = record.get("slides")
    if not isinstance(t, list):
        t = record.get("timings")
    return [e for e in t or [] if isinstance(e, dict)]


def _epoch(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


def _when(value: Any) -> str:
    t = _epoch(value)
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f} s"
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# ---- images --------------------------------------------------------------------------------


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _svg(fig: Any) -> str:
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "wsi-report"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return _data_uri(buf.getvalue(), "image/svg+xml")


def _png(img: Any) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return _data_uri(buf.getvalue(), "image/png")


def _bin_width(span: float) -> float:
    """A round bin width giving at most ~80 bins over the run."""
    for w in _BIN_WIDTHS:
        if span / w <= 80:
            return float(w)
    return float(math.ceil(span / 80 / 3600) * 3600)


def throughput(timings: list[dict[str, Any]], start: float | None
               ) -> dict[str, Any] | None:
    """Tiles/s per stage in round time bins: tiling spreads a slide's tiles over its tiling
    interval; written and committed count them at the moment each happened."""
    stamps = [t for e in timings for t in (_epoch(e.get("tiling_started_at")),
                                           _epoch(e.get("committed_at"))) if t is not None]
    if not stamps:
        return None
    t0 = start if start is not None and start <= min(stamps) else min(stamps)
    span = max(max(stamps) - t0, 1.0)
    width = _bin_width(span)
    edges = np.arange(int(span // width) + 2) * width  # the last event inside the last bin
    lo, hi = edges[:-1], edges[1:]
    series: dict[str, np.ndarray] = {}
    n = np.array([float(e.get("num_tiles") or 0) for e in timings])

    def at(key: str) -> np.ndarray:
        return np.array([(_epoch(e.get(key)) or np.nan) - t0 for e in timings])

    a, b = at("tiling_started_at"), at("last_chunk_at")
    if np.isfinite(a).any():
        b = np.where(np.isfinite(b), b, a)
        length = np.maximum(b - a, 0.0)[:, None]
        overlap = np.clip(np.minimum(b[:, None], hi) - np.maximum(a[:, None], lo), 0, None)
        instant = (length <= 1e-9) & (a[:, None] >= lo) & (a[:, None] < hi)
        share = np.where(length > 1e-9, overlap / np.maximum(length, 1e-9), instant)
        share = np.where(np.isfinite(share), share, 0.0)
        series["tiling"] = (share * n[:, None]).sum(0) / width
    for stage, key in (("written", "written_at"), ("committed", "committed_at")):
        t = at(key)
        ok = np.isfinite(t)
        if ok.any():
            counts, _ = np.histogram(t[ok], bins=edges, weights=n[ok])
            series[stage] = counts / width
    return {"t0": t0, "edges": edges, "width": width, "series": series}


def throughput_plot(tp: dict[str, Any]) -> str:
    """Tiles/s per stage (top) and the tiles each stage had done so far (bottom): the rate
    shows stalls, the running total reads well also for short runs of few slides."""
    fig = _figure(8.0, 4.6)
    rate_ax, total_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    edges = tp["edges"]
    minutes = edges[-1] > 600
    x = edges / 60 if minutes else edges
    style = {"tiling": ("#1b9e77", "-"), "written": ("#7570b3", "--"),
             "committed": ("#d95f02", "-")}
    for stage, rate in tp["series"].items():
        color, line = style.get(stage, (None, "-"))
        z = 3 if stage == "written" else 2  # written is often hidden under committed
        rate_ax.stairs(rate, x, label=stage, color=color, linestyle=line, linewidth=1.6,
                       zorder=z)
        total_ax.plot(x, np.concatenate([[0.0], np.cumsum(rate * tp["width"])]), color=color,
                      linestyle=line, linewidth=1.6, label=stage, zorder=z)
    rate_ax.set_ylabel("tiles / s")
    rate_ax.set_title(f"throughput per stage ({tp['width']:g} s bins)", fontsize=10)
    total_ax.set_ylabel("tiles so far")
    total_ax.set_xlabel("minutes since the run started" if minutes
                        else "seconds since the run started")
    for ax in (rate_ax, total_ax):
        ax.set_xlim(x[0], x[-1])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    rate_ax.legend(loc="upper left", fontsize=8, ncols=3)
    return _svg(fig)


def tiles_histogram(per_model: dict[str, list[int]]) -> str:
    fig = _figure(8.0, 2.8)
    ax = fig.add_subplot()
    values = [v for vs in per_model.values() for v in vs]
    top = max(values) if values else 1
    bins = np.linspace(0, top + 1, min(40, max(top + 1, 2)) + 1)
    for model, vs in per_model.items():
        ax.hist(vs, bins=bins, alpha=0.6, label=f"{model} ({len(vs)} slides)")
    ax.set_xlabel("tiles per slide")
    ax.set_ylabel("slides")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _svg(fig)


def _thumbnail(data: bytes, px: int = PREVIEW_PX) -> str:
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.thumbnail((px, px))
    if max(img.size) < px // 4:  # a tiny slide's preview: blow it up so it can be seen
        k = px // 2 // max(img.size)
        img = img.resize((img.width * k, img.height * k), Image.NEAREST)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=78, optimize=True)
    return _data_uri(buf.getvalue(), "image/jpeg")


def pca_rgb(xy: np.ndarray, emb: np.ndarray, tile_l0: float, *,
            extent: tuple[float, float] | None = None, fit_rows: int = PCA_FIT_ROWS,
            px: int = PCA_PX) -> tuple[Any, list[float]]:
    """The slide's tile grid with each tile painted by its embedding's first three principal
    components as RGB (each min-max scaled to 0..255), upscaled nearest-neighbour to about
    ``px``; and the fraction of variance each component explains. With the slide's level-0
    ``extent`` (width, height) the grid covers the whole slide, as its preview does; without,
    the tiles' bounding box."""
    from PIL import Image

    x = emb.astype(np.float32)
    mean = x.mean(0)
    fit = x if len(x) <= fit_rows else x[np.random.default_rng(0).choice(len(x), fit_rows,
                                                                           replace=False)]
    _, s, vt = np.linalg.svd(fit - mean, full_matrices=False)
    k = min(3, vt.shape[0])
    comps = vt[:k]
    # SVD signs are arbitrary: make each component's largest loading positive (stable colours)
    comps = comps * np.sign(comps[np.arange(k), np.abs(comps).argmax(1)])[:, None]
    proj = (x - mean) @ comps.T
    rgb = np.full((len(x), 3), 128.0)
    for c in range(k):
        lo, hi = proj[:, c].min(), proj[:, c].max()
        if hi - lo > 1e-12:
            rgb[:, c] = (proj[:, c] - lo) / (hi - lo) * 255.0
    total = float((s ** 2).sum())
    explained = [float(v) / total if total > 0 else 0.0 for v in (s[:k] ** 2)]
    origin = np.zeros(2) if extent else xy.min(0)
    col = np.rint((xy[:, 0] - origin[0]) / tile_l0).astype(int)
    row = np.rint((xy[:, 1] - origin[1]) / tile_l0).astype(int)
    cols, rows = col.max() + 1, row.max() + 1
    if extent:
        cols = max(cols, math.ceil(extent[0] / tile_l0 - 0.25))
        rows = max(rows, math.ceil(extent[1] / tile_l0 - 0.25))
    grid = np.full((rows, cols, 3), 255, np.uint8)
    grid[row, col] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    scale = max(1, px // max(grid.shape[:2]))
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                       Image.NEAREST)
    return img, explained


# ---- sections ------------------------------------------------------------------------------


def _models(record: dict[str, Any], lake: Lake) -> list[str]:
    cfg = record.get("config") or {}
    out = [m.get("id") for m in cfg.get("models") or [] if isinstance(m, dict) and m.get("id")]
    for key in ("committed", "tiles_encoded"):
        out += [m for m in (record.get("counts") or {}).get(key) or {} if m not in out]
    out += [m for m in (record.get("plan") or {}).get("work_per_model") or {} if m not in out]
    return out


def _counts(record: dict[str, Any], models: list[str], slides: dict[str, list[dict]],
            errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    counts = record.get("counts") or {}
    plan = record.get("plan") or {}
    failed_any = {r["slide_id"] for r in errors if not r.get("model")}
    rows = []
    for m in models:
        failed = {r["slide_id"] for r in errors if r.get("model") == m} | failed_any
        rows.append({
            "model": m,
            "planned": (plan.get("work_per_model") or {}).get(m),
            "up_to_date": (counts.get("up_to_date") or plan.get("up_to_date_per_model")
                           or {}).get(m),
            "committed": (counts.get("committed") or {}).get(m, len(slides.get(m, []))),
            "failed": len(failed),
            "tiles": (counts.get("tiles_encoded") or {}).get(m),
            "tiles_in_lake": sum(int(r.get("num_tiles") or 0) for r in slides.get(m, [])),
        })
    return rows


def _reason_key(reason: str) -> str:
    """Reasons that differ only in numbers or quoted names group together."""
    key = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", reason)
    return re.sub(r"\d+(\.\d+)?", "#", key)


def error_groups(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Errors by stage, then by reason (numbers and quoted names aside), largest first."""
    by_stage: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in errors:
        reason = str(r.get("reason") or "(no reason recorded)")
        by_stage[str(r.get("stage") or "?")][_reason_key(reason)].append(r)
    out = []
    for stage, groups in by_stage.items():
        items = []
        for rows in groups.values():
            ids = sorted({str(r.get("slide_id")) for r in rows})
            models = sorted({str(r.get("model") or "all models") for r in rows})
            items.append({"count": len(rows), "reason": str(rows[0].get("reason") or
                                                            "(no reason recorded)"),
                          "slides": ids[:6], "more": max(0, len(ids) - 6),
                          "models": models})
        items.sort(key=lambda g: (-g["count"], g["reason"]))
        out.append({"stage": stage, "count": sum(g["count"] for g in items), "groups": items})
    out.sort(key=lambda s: (-s["count"], s["stage"]))
    return out


def slowest(timings: list[dict[str, Any]], n: int = SLOWEST) -> list[dict[str, Any]]:
    rows = []
    for e in timings:
        start, last = _epoch(e.get("tiling_started_at")), _epoch(e.get("last_chunk_at"))
        written, done = _epoch(e.get("written_at")), _epoch(e.get("committed_at"))
        end = done or written or last
        if start is None or end is None:
            continue
        total = end - start
        tiles = int(e.get("num_tiles") or 0)
        rows.append({
            "slide_id": e.get("slide_id"), "tiles": tiles, "models": e.get("models") or [],
            "total": total,
            "tiling": (last - start) if last is not None else None,
            "encode_write": (written - last) if written is not None and last is not None
            else None,
            "commit_wait": (done - written) if done is not None and written is not None
            else None,
            "rate": tiles / total if total > 0 else None,
            "reader": e.get("reader"), "node": str(e.get("tiler_node") or "")[:12],
            "rss": e.get("tiler_peak_rss_mb"),
        })
    rows.sort(key=lambda r: -r["total"])
    return rows[:n]


def _preview_items(lake: Lake, slides: dict[str, list[dict]], errors: list[dict[str, Any]],
                   limit: int) -> tuple[list[dict[str, Any]], int]:
    """Error rows first (what a person must look at), then committed slides."""
    wanted: list[dict[str, Any]] = []
    seen: set[str] = set()
    for r in errors:
        p = r.get("preview_path")
        if p and p not in seen:
            seen.add(p)
            wanted.append({"path": p, "slide_id": r.get("slide_id"), "cohort": r.get("cohort"),
                           "label": f"error: {r.get('stage')}", "error": True,
                           "geojson": r.get("geojson_path")})
    for model, rows in slides.items():
        for r in rows:
            p = r.get("preview_path")
            if p and p not in seen:
                seen.add(p)
                wanted.append({"path": p, "slide_id": r.get("slide_id"),
                               "cohort": r.get("cohort"),
                               "label": f"{r.get('num_tiles')} tile"
                                        f"{'' if r.get('num_tiles') == 1 else 's'} ({model})",
                               "error": False, "geojson": r.get("geojson_path")})
    shown = []
    for item in wanted[:limit]:
        try:
            data = lake.fs.cat_file(join(lake.root, str(item["path"])))
            item["src"] = _thumbnail(data)
        except Exception as err:  # noqa: BLE001 - a missing preview must not sink the report
            item["missing"] = f"{type(err).__name__}: {err}"[:200]
        shown.append(item)
    return shown, len(wanted)


def _pca_maps(lake: Lake, output: str, storage: StorageConfig | None,
              slides: dict[str, list[dict]], per_model: int) -> list[dict[str, Any]]:
    if per_model <= 0:
        return []
    tile_models = set(lake.models(TILES))
    out = []
    for model, rows in slides.items():
        if model not in tile_models:
            continue  # slide encoders have no tile grid
        # a map of one or two tiles says nothing; huge slides cost too much memory here
        fit = [r for r in rows if r.get("tiles_path") and PCA_MIN_TILES
               <= int(r.get("num_tiles") or 0) <= PCA_MAX_TILES]
        fit.sort(key=lambda r: (-int(r["num_tiles"]), str(r["slide_id"])))
        for r in fit[:per_model]:
            sid = str(r["slide_id"])
            t = tiles_dataset(output, model, storage, slide_ids=[sid]).to_table(
                columns=["x", "y", "tile_l0", EMBEDDING])
            if t.num_rows == 0:
                continue
            col = t[EMBEDDING].combine_chunks()
            emb = col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1)
            xy = np.stack([np.asarray(t["x"]), np.asarray(t["y"])], 1).astype(np.float64)
            tile_l0 = float(np.median(np.asarray(t["tile_l0"], dtype=np.float64)))
            extent = (float(r["width"]), float(r["height"])) if r.get("width") and \
                r.get("height") else None
            img, explained = pca_rgb(xy, emb, tile_l0, extent=extent)
            out.append({"model": model, "slide_id": sid, "tiles": t.num_rows, "src": _png(img),
                        "width": img.width, "height": img.height,
                        "explained": ", ".join(f"{100 * v:.0f}%" for v in explained)})
    return out


# ---- the page ------------------------------------------------------------------------------

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Run {{ run_id }} ({{ status }})</title>
<link rel="icon" href="data:,">
<style>
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1100px;
padding:0 16px 40px;color:#222}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid
#ddd;padding-bottom:3px}table{border-collapse:collapse;margin:6px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.status{display:inline-block;padding:1px 8px;border-radius:3px;color:#fff;background:#777}
.succeeded{background:#2e7d32}.failed{background:#c62828}.running{background:#1565c0}
.warn{background:#fff3cd;border:1px solid #e0c36a;padding:6px 10px;margin:8px 0}
.note{color:#666;font-size:13px}.sheet{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;border:1px solid #ddd;padding:4px;background:#fafafa;max-width:260px}
figure.err{border-color:#c62828}figcaption{font-size:12px;overflow-wrap:anywhere}
.pca figure{max-width:none}.pair{display:flex;gap:6px;align-items:flex-start}
img{display:block;max-width:100%}
img.pix{image-rendering:pixelated}code{font-size:12px;overflow-wrap:anywhere}
</style></head><body>
<h1>Run <code>{{ run_id }}</code> <span class="status {{ status }}">{{ status }}</span></h1>
{% if error %}<div class="warn"><b>Run error:</b> {{ error }}</div>{% endif %}
{% if random_weights %}<div class="warn">Models with <b>random weights</b>:
{{ random_weights|join(", ") }}. Their embeddings are meaningless.</div>{% endif %}
<table>
<tr><th>lake</th><td><code>{{ lake }}</code></td></tr>
<tr><th>manifest</th><td><code>{{ manifest }}</code></td></tr>
<tr><th>started</th><td>{{ started }}</td></tr>
<tr><th>finished</th><td>{{ finished }}</td></tr>
<tr><th>wall time</th><td>{{ wall }}</td></tr>
<tr><th>code version</th><td>{{ code_version }}</td></tr>
<tr><th>versions</th><td>{{ versions }}</td></tr>
<tr><th>models</th><td>{% for m in model_info %}<code>{{ m.id }}</code> ({{ m.weights }}{% if
m.device %}, {{ m.device }}{% endif %}){% if not loop.last %}<br>{% endif %}{% endfor %}</td></tr>
{% if progress %}<tr><th>progress</th><td>{{ progress }}</td></tr>{% endif %}
</table>

<h2 id="counts">Counts</h2>
<p>{{ manifest_rows }} manifest rows; {{ errors_total }} error rows in this run;
{{ tiles_total }} tiles encoded ({{ rate }}).</p>
<table><tr><th>model</th><th>planned</th><th>already up to date</th><th>committed</th>
<th>failed</th><th>tiles encoded</th><th>tiles in committed rows</th></tr>
{% for c in counts %}<tr><td><code>{{ c.model }}</code></td><td class="n">{{ c.planned
if c.planned is not none else "-" }}</td><td class="n">{{ c.up_to_date if c.up_to_date is
not none else "-" }}</td><td class="n">{{ c.committed }}</td><td class="n">{{ c.failed }}</td>
<td class="n">{{ c.tiles if c.tiles is not none else "-" }}</td>
<td class="n">{{ c.tiles_in_lake }}</td></tr>{% endfor %}</table>

<h2 id="throughput">Throughput</h2>
{% if throughput %}<img alt="tiles per second over time per stage" src="{{ throughput }}">
<p class="note">Tiling spreads each slide's tiles over its tiling interval (first read to
last chunk); written and committed count them when the slide's tiles were written and
committed. Each tile counts once, however many models encode it.</p>
{% else %}<p class="note">No per-slide timings in this run record (nothing was committed, or
the run is still running).</p>{% endif %}

<h2 id="errors">Errors by stage</h2>
{% if errors %}<table><tr><th>stage</th><th>rows</th><th>reason (one example)</th>
<th>slides</th><th>models</th></tr>
{% for s in errors %}{% for g in s.groups %}<tr>{% if loop.first %}<td rowspan="{{
s.groups|length }}"><b>{{ s.stage }}</b><br>{{ s.count }} row{{
"s" if s.count != 1 else "" }}</td>{% endif %}
<td class="n">{{ g.count }}</td><td>{{ g.reason }}</td>
<td>{% for sid in g.slides %}<code>{{ sid }}</code>{% if not loop.last %}, {% endif %}{%
endfor %}{% if g.more %} and {{ g.more }} more{% endif %}</td>
<td>{{ g.models|join(", ") }}</td></tr>{% endfor %}{% endfor %}</table>
{% if errors_cut %}<p class="note">{{ errors_cut }}</p>{% endif %}
{% else %}<p>No errors in this run.</p>{% endif %}

<h2 id="tiles">Tiles per slide</h2>
{% if tiles_hist %}<img alt="histogram of tiles per slide" src="{{ tiles_hist }}">
<table><tr><th>model</th><th>slides</th><th>min</th><th>median</th><th>max</th><th>total</th>
</tr>{% for t in tiles_stats %}<tr><td><code>{{ t.model }}</code></td><td class="n">{{ t.n
}}</td><td class="n">{{ t.min }}</td><td class="n">{{ t.median }}</td><td class="n">{{ t.max
}}</td><td class="n">{{ t.total }}</td></tr>{% endfor %}</table>
{% else %}<p class="note">This run committed no slides.</p>{% endif %}

<h2 id="slowest">Slowest slides</h2>
{% if slow %}<table><tr><th>slide</th><th>tiles</th><th>total</th><th>tiling</th>
<th>encode + write</th><th>commit wait</th><th>tiles/s</th><th>reader</th><th>tiler node</th>
<th>tiler RSS</th></tr>{% for r in slow %}<tr><td><code>{{ r.slide_id }}</code></td>
<td class="n">{{ r.tiles }}</td><td class="n">{{ r.total_s }}</td><td class="n">{{ r.tiling_s
}}</td><td class="n">{{ r.encode_s }}</td><td class="n">{{ r.commit_s }}</td>
<td class="n">{{ r.rate_s }}</td><td>{{ r.reader or "-" }}</td><td><code>{{ r.node or "-"
}}</code></td><td class="n">{{ r.rss_s }}</td></tr>{% endfor %}</table>
<p class="note">Total: from the start of tiling to the commit. Encode + write: last chunk
read to the slide's tiles written (includes waiting for the encoders).</p>
{% else %}<p class="note">No per-slide timings.</p>{% endif %}

<h2 id="previews">Contact sheet</h2>
{% if previews %}<div class="sheet">{% for p in previews %}<figure{% if p.error %}
class="err"{% endif %} title="{{ p.path }}{% if p.geojson %} (contour: {{ p.geojson }}){%
endif %}">{% if p.src %}<img alt="preview of {{ p.slide_id }}" src="{{ p.src
}}">{% else %}<p class="note">preview unreadable: {{ p.missing }}</p>{% endif %}
<figcaption><code>{{ p.slide_id }}</code> [{{ p.cohort }}]<br>{{ p.label }}</figcaption>
</figure>{% endfor %}</div>
{% if previews_total > previews|length %}<p class="note">Showing {{ previews|length }} of {{
previews_total }} previews; all of them are under <code>{{ lake }}/previews/</code>.</p>
{% endif %}{% else %}<p class="note">No previews recorded for this run (slides and errors rows
name them in <code>preview_path</code>; lakes written before previews existed have none).</p>
{% endif %}

<h2 id="pca">Embedding maps (PCA)</h2>
{% if pca %}<p class="note">Each tile painted at its place on the slide by the first three
principal components of that slide's tile embeddings, as red, green and blue (each scaled to
its range on the slide). Tissue with similar embeddings gets similar colours.</p>
<div class="sheet pca">{% for p in pca %}<figure><div class="pair">{% if p.preview %}<img
alt="preview of {{ p.slide_id }}" src="{{ p.preview }}">{% endif %}<img class="pix"
alt="PCA map of {{ p.slide_id }}" src="{{ p.src }}" width="{{ p.width }}" height="{{ p.height
}}"></div>
<figcaption><code>{{ p.slide_id }}</code> · <code>{{ p.model }}</code><br>{{ p.tiles }} tiles;
variance explained: {{ p.explained }}</figcaption></figure>{% endfor %}</div>
{% else %}<p class="note">No embedding maps: this run committed no tile embeddings
(or pca_slides=0).</p>{% endif %}

<p class="note" style="margin-top:30px">Written {{ generated }} by pipeline {{ pipeline_version
}} (<code>python -m pipeline report</code>) from the lake alone.</p>
</body></html>
"""


def _num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def render_report(output: str, record: dict[str, Any], *, storage: StorageConfig | None = None,
                  pca_slides: int = 3, max_previews: int = MAX_PREVIEWS) -> str:
    """The page for one run record of the lake at ``output`` (HTML text)."""
    import jinja2

    from pipeline import __version__

    lake = Lake(output, storage)
    run_id = str(record.get("run_id"))
    cfg = record.get("config") or {}
    models = _models(record, lake)
    want = ["slide_id", "cohort", "num_tiles", "tiles_path", "width", "height", "preview_path",
            "geojson_path", "aggregation", "layer", "committed_at", "run_id"]
    slides: dict[str, list[dict[str, Any]]] = {}
    for m in lake.models(SLIDES):
        # slide-encoder tables hold one row per layer: count each slide once
        once: dict[str, dict[str, Any]] = {}
        for r in _rows(lake, SLIDES, m, want, run_id):
            once.setdefault(str(r["slide_id"]), r)
        slides[m] = list(once.values())
    errors = read_errors(output, run_id, storage).to_pylist()
    timings = _timings(record)
    for m in slides:
        if m not in models:
            models.append(m)

    weights = record.get("weights") or {}
    encoders = record.get("encoders") or {}
    model_info = []
    for m in models:
        w = weights.get(m) or {}
        model_info.append({"id": m, "weights": w.get("identity") or w.get("source") or "-",
                           "device": encoders.get(m)})
    random_weights = [m for m in models if (weights.get(m) or {}).get("random")]

    started, finished = _epoch(record.get("started_at")), _epoch(record.get("finished_at"))
    progress = record.get("progress") or {}
    wall, wall_note = record.get("wall_s"), ""
    if wall is None and started is not None:  # running (or died): up to its last update
        until = finished or _epoch(progress.get("at"))
        wall_note = "" if finished else " so far (to the last progress update)" if until \
            else " so far"
        wall = (until or datetime.now(timezone.utc).timestamp()) - started
    tiles_total = sum((record.get("counts") or {}).get("tiles_encoded", {}).values()) \
        if record.get("counts") else int(progress.get("tiles_committed") or 0) or \
        sum(int(e.get("num_tiles") or 0) for e in timings)
    progress_text = "" if record.get("status") != "running" else (
        f"{progress.get('slides_committed')}/{progress.get('slides_planned')} slides committed, "
        f"{progress.get('slides_failed')} failed, as of {_when(progress.get('at'))}")

    tp = throughput(timings, started)
    per_model_tiles = {m: [int(r.get("num_tiles") or 0) for r in rows]
                       for m, rows in slides.items() if rows}
    if not per_model_tiles and timings:
        per_model_tiles = {"(run record)": [int(e.get("num_tiles") or 0) for e in timings]}
    tiles_stats = [{"model": m, "n": len(v), "min": min(v), "median": int(np.median(v)),
                    "max": max(v), "total": sum(v)} for m, v in per_model_tiles.items()]
    groups = error_groups(errors)
    cut = ""
    if sum(len(s["groups"]) for s in groups) > MAX_ERROR_GROUPS:
        kept, n = [], 0
        for s in groups:
            room = MAX_ERROR_GROUPS - n
            if room <= 0:
                break
            kept.append({**s, "groups": s["groups"][:room]})
            n += len(kept[-1]["groups"])
        cut = (f"Showing the {MAX_ERROR_GROUPS} largest groups; read_errors(OUT, "
               f"{run_id!r}) has every row.")
        groups = kept
    slow = [{**r, "total_s": _duration(r["total"]), "tiling_s": _duration(r["tiling"]),
             "encode_s": _duration(r["encode_write"]), "commit_s": _duration(r["commit_wait"]),
             "rate_s": _num(r["rate"]), "rss_s": _num(r["rss"], "{:.0f} MB")}
            for r in slowest(timings)]
    previews, previews_total = _preview_items(lake, slides, errors, max_previews)
    pca = _pca_maps(lake, output, storage, slides, pca_slides)
    thumbs = {p["slide_id"]: p["src"] for p in previews if p.get("src")}
    for p in pca:  # the slide's picture beside its map, where the contact sheet has it
        p["preview"] = thumbs.get(p["slide_id"])
    versions = record.get("versions") or {}

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(TEMPLATE).render(
        run_id=run_id, status=str(record.get("status") or "unknown"),
        error=record.get("error"), random_weights=random_weights,
        lake=lake.url, manifest=cfg.get("manifest") or "-",
        started=_when(started), finished=_when(finished) if finished else "- (not finished)",
        wall=_duration(wall) + wall_note, code_version=versions.get("pipeline") or "-",
        versions=", ".join(f"{k} {v}" for k, v in versions.items() if k != "pipeline") or "-",
        model_info=model_info, progress=progress_text,
        manifest_rows=(record.get("plan") or {}).get("manifest_rows", "-"),
        errors_total=len(errors), tiles_total=tiles_total,
        rate=f"{tiles_total / wall:.1f} tiles/s over the wall time" if wall else "-",
        counts=_counts(record, models, slides, errors),
        throughput=throughput_plot(tp) if tp and tp["series"] else None,
        errors=groups, errors_cut=cut,
        tiles_hist=tiles_histogram(per_model_tiles) if per_model_tiles else None,
        tiles_stats=tiles_stats, slow=slow,
        previews=previews, previews_total=previews_total,
        pca=pca,
        generated=_when(datetime.now(timezone.utc)), pipeline_version=__version__,
    )


def default_path(lake: Lake, run_id: str) -> str:
    return join(lake.root, REPORTS, f"{run_id}.html")


def write_report(output: str, run_id: str | None = None, *,
                 storage: StorageConfig | None = None, path: str | None = None,
                 pca_slides: int = 3, record: dict[str, Any] | None = None) -> str:
    """Write the run's report (the latest run when ``run_id`` is None) to
    ``OUT/reports/<run_id>.html`` or ``path``; returns where it went (a path or URL).
    ``record``: the run record itself (the job, before it saves the record that links here).

    Raises ReportError when ``output`` is not a lake or has no such run."""
    storage = storage or StorageConfig()
    lake = Lake(output, storage)
    record = record if record is not None else _open_run(lake, run_id)
    page = render_report(output, record, storage=storage, pca_slides=pca_slides).encode()
    rid = str(record.get("run_id") or run_id)
    if path is None:
        target_fs, target, where = lake.fs, default_path(lake, rid), join(lake.url, REPORTS,
                                                                          f"{rid}.html")
    else:
        target_fs, target = url_to_fs(path, storage)
        where = path
    atomic_write_bytes(target_fs, target, page)
    return where


