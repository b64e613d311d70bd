"""Generated DICOM WSI series for tests: a tiled TIFF from tests/slidegen.py, converted by
wsidicomizer (real DICOM VL Whole Slide Microscopy instances, one per pyramid level, that
OpenSlide 4 opens), and a DICOM file that is no slide.

wsidicomizer reads the TIFF through its OpenSlide source: its opentile source needs the
libturbojpeg shared library, which this machine lacks.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from slidegen import tissue_renderer, write_slide


def write_dicom_wsi(folder: str | Path, *, width: int = 2048, height: int = 1536,
                    mpp: float = 0.5, levels: tuple[int, ...] = (1, 4), tile: int = 256,
                    seed: int = 0) -> list[Path]:
    """A DICOM WSI series of generated tissue in ``folder`` (created), one .dcm per level;
    returns the instances, largest (level 0) first."""
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.wsidicomizer import SourceIdentifier

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = write_slide(Path(tmp) / "src.svs", tissue_renderer(width, height, seed=seed),
                          width=width, height=height, mpp=mpp, levels=levels, tile=tile)
        files = WsiDicomizer.convert(
            src, folder, include_label=False, include_overview=False, include_thumbnail=False,
            workers=1, tile_size=tile, preferred_source=SourceIdentifier.OPENSLIDE)
    return sorted((Path(f) for f in files), key=lambda f: (-f.stat().st_size, f.name))


def write_not_wsi_dicom(path: str | Path) -> Path:
    """A valid DICOM file that is no whole-slide image (an 8x8 Secondary Capture)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, \
        meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = bytes(64)
    ds.save_as(path, enforce_file_format=True)
    return path


def copy_series(src: Path, dst: Path) -> Path:
    """A copy of a series folder (tests change members of their own copy)."""
    shutil.copytree(src, dst)
    return dst
