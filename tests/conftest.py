"""Test-wide set-up. The thread budget below must be set before anything imports torch."""

import os

# Each pytest worker (pytest-xdist, Makefile: TEST_WORKERS) gets its share of the cores for
# torch and OpenBLAS: with every worker taking all of them, the cores are oversubscribed and
# idle OpenMP threads spin (measured: the torch-heavy test files ran in a third less time).
# Ray's workers set their own (the job's encoder CPUs); a value set by the caller wins. Only
# in a worker: xdist's controller imports this file too, and its workers inherit its
# environment.
if "PYTEST_XDIST_WORKER" in os.environ:
    _WORKERS = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

pytest_plugins = ["lake_fixtures"]


# ---- generated slides for the tiling tests (tests/slidegen.py) -------------------------------
# One session directory; every slide is written once and shared. Keep this block together.

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from slidegen import (  # noqa: E402
    TINY_SLIDE,
    copy_tiny,
    write_blank_slide,
    write_corrupt_tiles,
    write_not_a_slide,
    write_pyramid_svs,
    write_truncated,
)


@pytest.fixture(scope="session")
def generated_slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> path of small generated slides covering every case the tiling stage handles.

    pyramid_025: Aperio, 4096x3072, 0.25 mpp, levels 1/4/16, tissue pieces on glass
    flat_050: Aperio, 2048x1536, 0.5 mpp, one level, tissue everywhere
    generic_nompp: generic tiled TIFF, 1024x768, levels 1/4, no mpp in the file
    blank: Aperio, 0.25 mpp, empty glass; truncated: pyramid_025 cut in half;
    corrupt_tiles: pyramid_025 with damaged level-0 tiles; not_a_slide: text named .svs;
    tiny: the bundled 16x16 Aperio slide.
    """
    d = tmp_path_factory.mktemp("generated_slides")
    slides = {
        "pyramid_025": write_pyramid_svs(d / "pyramid_025.svs", width=4096, height=3072,
                                         mpp=0.25, levels=(1, 4, 16), seed=1),
        "flat_050": write_pyramid_svs(d / "flat_050.svs", width=2048, height=1536, mpp=0.5,
                                      levels=(1,), background=False, seed=2),
        "generic_nompp": write_pyramid_svs(d / "generic_nompp.tiff", width=1024, height=768,
                                           mpp=None, levels=(1, 4), background=False),
        "blank": write_blank_slide(d / "blank.svs"),
        "not_a_slide": write_not_a_slide(d / "not_a_slide.svs"),
        "tiny": copy_tiny(d / TINY_SLIDE.name),
    }
    slides["truncated"] = write_truncated(d / "truncated.svs", slides["pyramid_025"])
    slides["corrupt_tiles"] = write_corrupt_tiles(d / "corrupt_tiles.svs", slides["pyramid_025"])
    return slides


# ---- end of generated slides block -----------------------------------------------------------
