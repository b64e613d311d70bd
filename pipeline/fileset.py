"""A slide's file set: which files make one slide of a multi-file format.

Pure rules, no storage calls: given the main path and the listings (and, for the formats
whose index names its files, the index text) of its neighbourhood, :func:`resolve` says which
files belong to the slide, which one OpenSlide opens, and what is missing. pipeline.storage
does the listing, stages the members as a unit, and fingerprints the set from listings.

    3DHistech MRXS   x.mrxs + the folder x/ (Slidedat.ini, Data*.dat, Index.dat)
    Hamamatsu VMS    x.vms + the files its INI names (ImageFile, ImageFile(x,y), MapFile,
                     OptimisationFile), beside it
    Olympus VSI      x.vsi + the folder _x_/ (stack*/frame_t.ets); OpenSlide does not read it
    DICOM WSI        the .dcm instances of a folder: the uri names the folder or one .dcm
                     of it; every .dcm of the folder is staged (OpenSlide takes the series
                     of the file it opens)

Every other slide is one file, not a set (``format_of`` is None). Paths are '/'-separated
fsspec paths (no protocol); a member's ``rel`` is its path relative to the set's ``root``, so
a staged copy keeps the layout OpenSlide expects.
"""

from __future__ import annotations

import configparser
import hashlib
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

FORMATS = {".mrxs": "mrxs", ".vms": "vms", ".vsi": "vsi", ".dcm": "dicom"}
NAMES = {"mrxs": "MRXS", "vms": "VMS", "vsi": "VSI", "dicom": "DICOM"}
INDEX_TEXT_MAX = 1 << 20  # Slidedat.ini and .vms files are a few kB


class FileSetError(ValueError):
    """Members of a multi-file slide are missing; the message names them and what to do."""


@dataclass(frozen=True)
class Entry:
    """One file of a listing: its path, size and version (ETag/mtime, as a fingerprint's)."""

    path: str
    size: int
    version: str


@dataclass(frozen=True)
class Need:
    """What :func:`resolve` needs for one slide: the folders to list (``recursive``: the
    whole tree below) and the small index files whose text names members."""

    folders: tuple[tuple[str, bool], ...]
    texts: tuple[str, ...] = ()
    main_listed: bool = False  # the main file's entry comes with the folders' listings


@dataclass(frozen=True)
class FileSet:
    """The files of one slide, relative to ``root``; ``opener`` is the one OpenSlide opens."""

    format: str
    root: str
    opener: str
    members: tuple[tuple[str, Entry], ...]  # (rel, entry), sorted by rel

    @property
    def size(self) -> int:
        return sum(e.size for _, e in self.members)

    @property
    def version(self) -> str:
        """One value for the whole set, from every member's name, size and version: a member
        added, removed, renamed or rewritten changes it."""
        h = hashlib.sha256()
        for rel, e in self.members:
            h.update(f"{rel}\0{e.size}\0{e.version}\n".encode())
        return f"set={self.format}:{len(self.members)}:{h.hexdigest()[:24]}"


def _stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


def _parent(path: str) -> str:
    return posixpath.dirname(path.rstrip("/"))


def format_of(path: str) -> str | None:
    """The multi-file format a main file's name says (mrxs, vms, vsi, dicom), or None."""
    return FORMATS.get(posixpath.splitext(path.rstrip("/"))[1].lower())


def mrxs_folder(main: str) -> str:
    return posixpath.join(_parent(main), _stem(main))


def vsi_folder(main: str) -> str:
    return posixpath.join(_parent(main), f"_{_stem(main)}_")


def neighbourhood(main: str, *, folder: bool = False) -> Need:
    """What to list (and read) to resolve the set of ``main`` (``folder``: main names a
    folder, a DICOM series)."""
    main = main.rstrip("/")
    if folder:
        return Need(((main, False),))
    fmt = format_of(main)
    if fmt == "mrxs":
        return Need(((mrxs_folder(main), False),))
    if fmt == "vsi":
        return Need(((vsi_folder(main), True),))
    if fmt == "vms":
        return Need(((_parent(main), False),), texts=(main,), main_listed=True)
    if fmt == "dicom":
        return Need(((_parent(main), False),), main_listed=True)
    raise ValueError(f"{main!r} is a single-file slide, not a file set")


def _ini(text: str) -> configparser.RawConfigParser:
    ini = configparser.RawConfigParser(strict=False, interpolation=None)
    ini.optionxform = str.lower  # type: ignore[assignment,method-assign]
    ini.read_string(text.lstrip("\ufeff"))
    return ini


def vms_members(text: str) -> list[str]:
    """File names a Hamamatsu .vms INI names (relative to the .vms's folder)."""
    ini = _ini(text)
    names: list[str] = []
    for section in ini.sections():
        for key, value in ini.items(section):
            value = value.strip().strip('"')
            if value and (key.startswith("imagefile") or key in ("mapfile",
                                                                  "optimisationfile")):
                names.append(value.replace("\\", "/"))
    return list(dict.fromkeys(names))


def mrxs_members(text: str) -> list[str]:
    """File names Slidedat.ini names (relative to the data folder): the index file and the
    data files."""
    ini = _ini(text)
    names: list[str] = []
    if ini.has_option("HIERARCHICAL", "indexfile"):
        names.append(ini.get("HIERARCHICAL", "indexfile").strip())
    if ini.has_section("DATAFILE"):
        count = ini.get("DATAFILE", "file_count", fallback="0").strip()
        for i in range(int(count) if count.isdigit() else 0):
            name = ini.get("DATAFILE", f"file_{i}", fallback="").strip()
            if name:
                names.append(name)
    return [n.replace("\\", "/") for n in names if n]


def _names(paths: Iterable[str], limit: int = 6) -> str:
    paths = list(paths)
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def resolve(main: str, entries: Sequence[Entry], texts: Mapping[str, str] | None = None,
            *, folder: bool = False) -> FileSet:
    """The file set of ``main`` from the listings of its :func:`neighbourhood`.

    ``entries``: the files listed (the main file's own entry among them, whether it came
    from a listing or a HEAD); ``texts``: the text of the index files in ``Need.texts``,
    and optionally of an MRXS Slidedat.ini (then the files it names are checked too).
    Raises :class:`FileSetError` naming what is missing.
    """
    texts = texts or {}
    main = main.rstrip("/")
    files = {e.path.rstrip("/"): e for e in entries}
    if folder:
        return _dicom_folder(main, files)
    fmt = format_of(main)
    base = posixpath.basename(main)
    if main not in files:
        raise FileSetError(f"{NAMES.get(fmt or '', '')} slide file {main} not found")
    root = _parent(main)
    if fmt == "mrxs":
        data = mrxs_folder(main)
        inside = _under(files, data, recursive=False)
        stem = _stem(main)
        if f"{data}/Slidedat.ini" not in files:
            what = "is missing" if not inside else "has no Slidedat.ini"
            raise FileSetError(
                f"MRXS slide {base}: its data folder {stem}/ {what} (Slidedat.ini not found); "
                f"upload the folder {stem}/ beside the .mrxs")
        ini = texts.get(f"{data}/Slidedat.ini")
        if ini is not None:
            missing = [f"{stem}/{n}" for n in mrxs_members(ini) if f"{data}/{n}" not in files]
            if missing:
                raise FileSetError(
                    f"MRXS slide {base}: {_names(missing)} named by {stem}/Slidedat.ini "
                    f"{'is' if len(missing) == 1 else 'are'} missing; upload the whole "
                    f"folder {stem}/ beside the .mrxs")
        return _set(fmt, root, base, {main: files[main], **inside})
    if fmt == "vsi":
        ets = vsi_folder(main)
        inside = _under(files, ets, recursive=True)
        folder_name = posixpath.basename(ets)
        if not any(p.lower().endswith(".ets") for p in inside):
            what = "is missing" if not inside else "holds no .ets file"
            raise FileSetError(
                f"VSI slide {base}: its image folder {folder_name}/ {what} (no "
                f"stack*/frame_t.ets found); upload the folder {folder_name}/ beside the .vsi")
        return _set(fmt, root, base, {main: files[main], **inside})
    if fmt == "vms":
        if main not in texts:
            raise ValueError(f"resolve({main!r}) needs the text of the .vms")
        named = vms_members(texts[main])
        if not named:
            raise FileSetError(f"VMS slide {base}: its INI names no ImageFile; the .vms is "
                               "damaged or not a Hamamatsu VMS index")
        paths = {n: posixpath.normpath(posixpath.join(root, n)) for n in named}
        missing = [n for n, p in paths.items() if p not in files]
        if missing:
            raise FileSetError(
                f"VMS slide {base}: {_names(missing)} named by {base} "
                f"{'is' if len(missing) == 1 else 'are'} missing; upload "
                f"{'it' if len(missing) == 1 else 'them'} beside the .vms")
        return _set(fmt, root, base, {main: files[main], **{p: files[p] for p in paths.values()}})
    if fmt == "dicom":
        siblings = {p: e for p, e in _under(files, root, recursive=False).items()
                    if p.lower().endswith(".dcm")}
        return _set(fmt, root, base, siblings)
    raise ValueError(f"{main!r} is a single-file slide, not a file set")


def _dicom_folder(folder: str, files: Mapping[str, Entry]) -> FileSet:
    instances = {p: e for p, e in _under(files, folder, recursive=False).items()
                 if p.lower().endswith(".dcm")}
    if not instances:
        raise FileSetError(
            f"{folder}/ holds no .dcm files: a slide uri names a slide file, or a folder of "
            "DICOM WSI instances (.dcm)")
    # OpenSlide opens any instance and finds the rest of its series beside it; the largest
    # is the full-resolution level's, so a folder with several series reads the main one.
    opener = max(instances, key=lambda p: (instances[p].size, p))
    return _set("dicom", folder, posixpath.basename(opener), instances)


def _under(files: Mapping[str, Entry], folder: str, *, recursive: bool) -> dict[str, Entry]:
    prefix = folder.rstrip("/") + "/"
    return {p: e for p, e in files.items() if p.startswith(prefix)
            and (recursive or "/" not in p[len(prefix):])}


def _set(fmt: str, root: str, opener: str, members: Mapping[str, Entry]) -> FileSet:
    prefix = root.rstrip("/") + "/" if root else ""
    rels = sorted((p[len(prefix):], e) for p, e in members.items())
    return FileSet(fmt, root, opener, tuple(rels))
