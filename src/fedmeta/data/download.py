"""Fetches TFF's official federated archives into a cache and finds dataset files on disk.

TFF publishes no checksum for its archives, so the sha256 of the first download is
recorded next to it (``<archive>.sha256``) and every later download or re-extraction
must match it: a changed or corrupted archive is refused, not silently used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm


class Archive(NamedTuple):
    url: str
    files: tuple[str, str]  # (train, test) inside the archive
    local_names: tuple[tuple[str, str], ...]  # other accepted (train, test) names, e.g. LEAF-built files
    sha256: str | None = None  # published checksum, where one is known


DATASETS: dict[str, Archive] = {
    "emnist": Archive(
        "https://storage.googleapis.com/tff-datasets-public/fed_emnist.tar.bz2",
        ("fed_emnist_train.h5", "fed_emnist_test.h5"),
        (("femnist_train.h5", "femnist_test.h5"),),
    ),
    "shakespeare": Archive(
        "https://storage.googleapis.com/tff-datasets-public/shakespeare.tar.bz2",
        ("shakespeare_train.h5", "shakespeare_test.h5"),
        (),
    ),
}


class DownloadError(RuntimeError):
    """A dataset could not be fetched or verified; the message says what to do by hand."""


def default_cache_dir() -> Path:
    """``$FEDMETA_CACHE``, else ``~/.cache/fedmeta``."""
    return Path(os.environ.get("FEDMETA_CACHE", Path.home() / ".cache" / "fedmeta"))


def _archive(name: str) -> Archive:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def dataset_paths(name: str, data_dir: str | Path) -> tuple[Path, Path]:
    """The (train, test) h5 files of ``name`` in ``data_dir``, official or LEAF-built names."""
    archive, data_dir = _archive(name), Path(data_dir)
    candidates = (archive.files, *archive.local_names)
    for train, test in candidates:
        if (data_dir / train).is_file() and (data_dir / test).is_file():
            return data_dir / train, data_dir / test
    wanted = " or ".join(f"{train} + {test}" for train, test in candidates)
    raise FileNotFoundError(f"{data_dir}: no {name} files ({wanted}); run `fedmeta data download {name}` "
                            "or set data.path to the directory that holds them")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, target: Path, progress: bool) -> None:
    partial = target.with_name(target.name + ".partial")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as error:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"cannot fetch {url} ({getattr(error, 'reason', error)})") from None
    os.replace(partial, target)


def _verify(archive_path: Path, published: str | None) -> None:
    actual = _sha256(archive_path)
    recorded = archive_path.with_name(archive_path.name + ".sha256")
    expected = published or (recorded.read_text().split()[0] if recorded.is_file() else None)
    if expected is None:
        recorded.write_text(f"{actual}  {archive_path.name}\n")
    elif actual != expected:
        raise DownloadError(f"{archive_path}: sha256 {actual} does not match the expected {expected}; "
                            "delete the archive and download it again")


def download(name: str, cache_dir: str | Path | None = None, *, url: str | None = None,
             progress: bool = True) -> dict[str, Path]:
    """Fetches, verifies and extracts dataset ``name``; returns ``{"train": ..., "test": ...}``.

    Files already in ``cache_dir/name`` are reused. ``url`` replaces the official one (a
    mirror). Offline, raises ``DownloadError`` saying which files to place where.
    """
    archive = _archive(name)
    folder = Path(cache_dir or default_cache_dir()) / name
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"train": folder / archive.files[0], "test": folder / archive.files[1]}
    if all(p.is_file() for p in paths.values()):
        return paths
    source = url or archive.url
    archive_path = folder / source.rsplit("/", 1)[-1]
    try:
        if not archive_path.is_file():
            _fetch(source, archive_path, progress)
        _verify(archive_path, archive.sha256)
    except DownloadError as error:
        raise DownloadError(f"{error}. Download it elsewhere and put it in {folder}/, or put "
                            f"{archive.files[0]} and {archive.files[1]} there yourself") from None
    with tarfile.open(archive_path, "r:bz2") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for path in paths.values():
            if path.name not in members:
                raise DownloadError(f"{archive_path}: has no {path.name} (has {sorted(members)})")
            with tar.extractfile(members[path.name]) as source_file, open(path, "wb") as out:
                shutil.copyfileobj(source_file, out)
    return paths
