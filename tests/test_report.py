"""The run report (pipeline.report): content from a real job's lake, and the page in a real
headless browser (Chromium from the OS packages, driven by Playwright)."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from jobkit import DATA, generated_cohort, job_config, write_manifest
from markupsafe import escape
from PIL import Image

from pipeline.cli import main
from pipeline.report import ReportError, _preview_items, pca_rgb, throughput, write_report
from pipeline.run import run_job
from pipeline.sink import Lake, read_errors, read_slides

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# Characters HTML must escape, in a slide id and in a uri (the "missing file" reason names it).
HOSTILE = '<script>alert("x")</script> & <b>bold</b>'
HOSTILE_MISSING = 'gone<img src=x onerror=alert(1)>&amp;'


def esc(text: str) -> str:
    """As the page's template escapes a value."""
    return str(escape(text))


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory, local_ray: None) -> dict[str, Any]:
    """One small real job: two generated slides (one with a hostile id), one too small for a
    tile, one missing file; so every section of the report has real rows."""
    d = tmp_path_factory.mktemp("report")
    rows = generated_cohort(d / "slides", 2, seed=11, width=1100, height=900)
    rows[1]["slide_id"] = HOSTILE
    shutil.copy(DATA / "tiny-16px.svs", d / "tiny.svs")
    rows += [{"slide_id": "tiny", "uri": str(d / "tiny.svs"), "cohort": "c"},
             {"slide_id": HOSTILE_MISSING, "uri": str(d / f"{HOSTILE_MISSING}.svs"),
              "cohort": "c"}]
    manifest = write_manifest(d / "manifest.csv", rows)
    out = str(d / "lake")
    record = run_job(job_config(str(manifest), out))
    assert record["status"] == "succeeded", record.get("error")
    return {"out": out, "record": record, "dir": d}


def test_report_content_matches_the_lake(lake: dict[str, Any]) -> None:
    out, record = lake["out"], lake["record"]
    where = write_report(out)  # the latest run: this one
    assert where == f"{out}/reports/{record['run_id']}.html"
    page = Path(where).read_text()

    slides = read_slides(out, columns=["slide_id", "num_tiles"]).to_pylist()
    errors = read_errors(out, record["run_id"]).to_pylist()
    assert len(slides) == 2 and len(errors) == 2
    # Counts: the model's row says what the lake holds.
    tiles = sum(r["num_tiles"] for r in slides)
    row = re.search(r"<tr><td><code>kaiko-vits16</code></td>(.*?)</tr>", page, re.S)
    assert row, "no counts row for the model"
    cells = re.findall(r'<td class="n">([^<]*)</td>', row.group(1))
    # 3 planned (the missing file fails before tiling), 2 committed, 2 failed
    assert cells == ["3", "0", "2", "2", str(tiles), str(tiles)], cells
    assert f"{len(errors)} error rows in this run" in page
    assert record["run_id"] in page and "succeeded" in page
    # Errors grouped by stage, each with its reason.
    for e in errors:
        assert esc(e["stage"]) in page and esc(e["reason"]) in page, e["reason"]
    stages = re.findall(r"<td rowspan=\"\d+\"><b>([^<]+)</b>", page)
    assert sorted(stages) == sorted({e["stage"] for e in errors})
    # Hostile values appear escaped only: no markup of theirs reaches the page.
    assert HOSTILE not in page and "<script>" not in page and "<img src=x" not in page
    assert esc(HOSTILE) in page
    assert "&lt;img src=x onerror=alert(1)&gt;&amp;amp;" in page
    # Slowest slides, tiles per slide, PCA maps: both committed slides (>= 4 tiles each).
    slow = page.split('id="slowest"')[1].split('id="previews"')[0]
    for r in slides:
        assert esc(r["slide_id"]) in slow
    assert page.count('alt="PCA map of ') == 2
    assert page.count("data:image/svg+xml;base64,") == 2  # throughput and histogram plots
    # Self-contained: nothing is fetched from anywhere.
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)
    assert "<script" not in page.lower()


def test_report_cli_and_errors(lake: dict[str, Any], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    out, rid = lake["out"], lake["record"]["run_id"]
    dest = tmp_path / "r.html"
    assert main(["report", out, "--run", rid, "--out", str(dest), "--pca-slides", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(dest)
    assert dest.read_text().count('alt="PCA map of ') == 1

    assert main(["report", out, "--run", "no-such-run"]) == 2
    err = capsys.readouterr().err
    assert "no-such-run" in err and rid in err  # names the runs present

    with pytest.raises(ReportError, match="not a lake"):
        write_report(str(tmp_path))
    with pytest.raises(ReportError, match="does not exist"):
        write_report(str(tmp_path / "nowhere"))


def test_contact_sheet_reads_previews_through_the_lake(tmp_path: Path) -> None:
    """Preview JPEGs named by slides/errors rows are read from the lake, downscaled, capped."""
    lake = Lake(str(tmp_path))
    folder = tmp_path / "previews" / "h" / "c"
    folder.mkdir(parents=True)
    rows = []
    for i in range(4):
        Image.new("RGB", (900, 600), (40 * i, 100, 200)).save(folder / f"s{i}.jpg")
        rows.append({"slide_id": f"s{i}", "cohort": "c", "num_tiles": 3,
                     "preview_path": f"previews/h/c/s{i}.jpg"})
    rows.append({"slide_id": "none", "cohort": "c", "num_tiles": 1, "preview_path": None})
    errors = [{"slide_id": "bad", "cohort": "c", "stage": "no_tissue",
               "preview_path": "previews/h/c/gone.jpg"}]
    shown, total = _preview_items(lake, {"m": rows}, errors, limit=3)
    assert total == 5 and len(shown) == 3
    assert shown[0]["slide_id"] == "bad" and "missing" in shown[0]  # errors first
    img = Image.open(io.BytesIO(base64.b64decode(shown[1]["src"].split(",", 1)[1])))
    assert img.format == "JPEG" and max(img.size) <= 240 and img.size[0] > img.size[1]


def test_pca_map_paints_the_tile_grid() -> None:
    # Two tissue kinds on a 3x2 grid with a hole: the map has their two colours and white.
    xy = np.array([[0, 0], [448, 0], [896, 0], [0, 448], [896, 448]], float) + 100
    emb = np.array([[1, 0, 0], [1, 0, 0], [0, 5, 0], [1, 0.1, 0], [0, 5, 0.2]], np.float32)
    img, explained = pca_rgb(xy, emb, 448.0, px=30)
    a = np.asarray(img)
    assert a.shape == (20, 30, 3)  # 2 rows x 3 cols, 10 px per tile
    assert (a[15, 15] == 255).all()  # the hole
    assert not np.array_equal(a[5, 5], a[5, 25])  # different tissue, different colour
    np.testing.assert_array_equal(a[5, 5], a[5, 15])
    assert explained[0] > 0.9 and abs(sum(explained) - 1) < 1e-6
    # With the slide's extent the grid covers the whole slide (here 4x3 tiles from 0,0).
    whole, _ = pca_rgb(xy, emb, 448.0, extent=(1800.0, 1300.0), px=40)
    b = np.asarray(whole)
    assert b.shape == (30, 40, 3)
    np.testing.assert_array_equal(b[5, 5], a[5, 5])  # tile (0, 0) at 100,100: first cell
    assert (b[:, 35] == 255).all() and (b[25] == 255).all()  # slide beyond the tiles


def test_throughput_bins_spread_tiling() -> None:
    timings = [{"num_tiles": 100, "tiling_started_at": 10.0, "last_chunk_at": 20.0,
                "written_at": 25.0, "committed_at": 26.0}]
    tp = throughput(timings, start=10.0)
    assert tp["width"] == 1.0
    np.testing.assert_allclose(tp["series"]["tiling"][:10], 10.0)
    assert tp["series"]["tiling"].sum() == pytest.approx(100)
    assert tp["series"]["committed"][16] == 100 and tp["series"]["written"][15] == 100


def _playwright() -> Any:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install it with `apt-get install -y chromium` "
                    "(Debian/Ubuntu; .ci/run does) or set CHROMIUM=/path/to/chromium")
    from playwright.sync_api import sync_playwright  # dev extra

    return sync_playwright()


def test_report_in_a_headless_browser(lake: dict[str, Any], tmp_path: Path) -> None:
    with _playwright() as pw:
        where = write_report(lake["out"], path=str(tmp_path / "report.html"))
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            fetched: list[str] = []
            page.on("request", lambda r: fetched.append(r.url)
                    if not r.url.startswith(("data:", "file:")) else None)
            dialogs: list[str] = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(Path(where).as_uri(), wait_until="load")
            images = page.evaluate("""Array.from(document.images).map(i => ({
                alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}))""")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            title = page.title()
        finally:
            browser.close()
    assert problems == [] and fetched == [] and dialogs == []
    assert len(images) >= 4, images  # two plots, two PCA maps
    for img in images:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0, img
    assert lake["record"]["run_id"] in title
    png = Image.open(shot)
    assert png.format == "PNG" and png.width == 1200 and png.height > 1500
    pixels = np.asarray(png.convert("RGB"))
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200
