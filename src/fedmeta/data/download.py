"""Fetches TFF's official federated archives into a cache and finds dataset files on disk.

TFF publishes no checksum for its archives, so the sha256 of the first archive that
extracts cleanly is recorded next to it (``<archive>.sha256``), and every later
download or re-extraction must match it: a changed or corrupted archive is refused,
not silently used.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import shutil
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm


class Archive(NamedTuple):
    """Where a dataset is published and which files it holds."""

    url: str
    files: tuple[str, str]  # (train, test) h5 files inside the archive
    local_names: tuple[tuple[str, str], ...]  # other accepted (train, test) names, e.g. LEAF-built files
    sha256: str | None = None  # published checksum of the archive, where one is known

    @property
    def filename(self) -> str:
        return Path(urllib.parse.urlparse(self.url).path).name


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
    """A dataset could not be fetched, verified or extracted; the message says what to do by hand."""


def default_cache_dir() -> Path:
    """``$FEDMETA_CACHE``, else ``~/.cache/fedmeta``; dataset ``name`` lives in ``<cache>/<name>/``."""
    return Path(os.environ.get("FEDMETA_CACHE", Path.home() / ".cache" / "fedmeta"))


def _archive(name: str) -> Archive:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def dataset_paths(name: str, data_dir: str | Path) -> tuple[Path, Path]:
    """The (train, test) h5 files of dataset ``name`` in ``data_dir``.

    Accepts TFF's names (``fed_emnist_train.h5``) and the LEAF-built ones
    (``femnist_train.h5``), in that order of preference.

    Raises:
        ValueError: ``name`` is not in ``DATASETS``.
        FileNotFoundError: ``data_dir`` is not a directory, or neither pair is there; the
            message lists what was looked for.
    """
    archive, data_dir = _archive(name), Path(data_dir)
    found = _not_a_file(data_dir, "directory")
    if found:
        raise FileNotFoundError(f"{data_dir}: {found}; set data.path to the directory that holds the {name} files, "
                                f"or run `fedmeta data download {name}`")
    candidates = (archive.files, *archive.local_names)
    for train, test in candidates:
        problems = {path: _not_a_file(path, "file") for path in (data_dir / train, data_dir / test)}
        if not any(problems.values()):
            return data_dir / train, data_dir / test
        for path, problem in problems.items():
            if problem not in (None, "no such file"):  # there, but unreadable: say so rather than "no files"
                raise FileNotFoundError(f"{path}: {problem}; expected the {name} h5 file")
    wanted = " or ".join(f"{train} + {test}" for train, test in candidates)
    raise FileNotFoundError(f"{data_dir}: no {name} files ({wanted}); run `fedmeta data download {name}` "
                            "or set data.path to the directory that holds them")


def _not_a_file(path: Path, kind: str) -> str | None:
    """Why ``path`` is not a ``kind`` ("file" or "directory") one can open, in a few words; None if it is."""
    try:
        mode = path.stat().st_mode
    except OSError as error:  # missing, a symlink loop, a name too long, no permission
        return f"no such {kind}" if error.errno == errno.ENOENT else f"cannot be read ({error.strerror})"
    if kind == "directory":
        return None if stat.S_ISDIR(mode) else "not a directory"
    return None if stat.S_ISREG(mode) else "a directory, not a file" if stat.S_ISDIR(mode) else "not a regular file"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, target: Path, progress: bool) -> None:
    """Streams ``url`` to ``target``; a failed or short transfer leaves nothing behind."""
    partial = target.with_name(target.name + ".partial")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
            written = out.tell()
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as error:
        partial.unlink(missing_ok=True)
        raise DownloadError(f"cannot fetch {url} ({getattr(error, 'reason', error)})") from None
    if total is not None and written != total:
        partial.unlink()
        raise DownloadError(f"cannot fetch {url} (got {written} of {total} bytes)")
    os.replace(partial, target)


def _extract(archive_path: Path, targets: list[Path]) -> None:
    """Extracts the members named like ``targets`` (in any folder of the archive) to ``targets``."""
    try:
        with tarfile.open(archive_path, "r:bz2") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for target in targets:
                if target.name not in members:
                    raise DownloadError(f"{archive_path}: has no {target.name} (has {sorted(members)})")
                partial = target.with_name(target.name + ".partial")
                with tar.extractfile(members[target.name]) as source, open(partial, "wb") as out:
                    shutil.copyfileobj(source, out)
                os.replace(partial, target)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DownloadError(f"{archive_path}: not a readable tar.bz2 archive ({error})") from None


def download(name: str, cache_dir: str | Path | None = None, *, url: str | None = None,
             progress: bool = True) -> dict[str, Path]:
    """Fetches, verifies and extracts dataset ``name``; returns ``{"train": path, "test": path}``.

    Files already in ``<cache_dir>/<name>/`` are reused without any network access, and
    so is an archive already there (put by hand, or left by an earlier call). An archive
    fetched here that fails to verify or extract is removed, so a later call, with
    another ``url`` say, fetches again rather than failing on it.

    Args:
        name: a key of ``DATASETS``.
        cache_dir: the cache root; ``None`` for ``default_cache_dir()``.
        url: where to fetch the archive instead of TFF's bucket (a mirror, or a
            ``file://`` URL); it is stored and verified under the official file name.
        progress: show a tqdm progress bar while fetching.

    Raises:
        ValueError: ``name`` is not in ``DATASETS``.
        DownloadError: the archive could not be fetched, did not match its checksum, or
            could not be extracted; one message says which and what to place where.
    """
    archive = _archive(name)
    root = Path(cache_dir if cache_dir is not None else default_cache_dir())
    folder = root / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cache directory {root}: cannot create {folder} ({error.strerror or error})") from None
    paths = {"train": folder / archive.files[0], "test": folder / archive.files[1]}
    if all(p.is_file() for p in paths.values()):
        return paths
    archive_path = folder / archive.filename
    recorded = archive_path.with_name(archive_path.name + ".sha256")
    expected = archive.sha256 or (recorded.read_text().split()[0] if recorded.is_file() else None)
    fetched = not archive_path.is_file()
    try:
        if fetched:
            _fetch(url or archive.url, archive_path, progress)
        actual = _sha256(archive_path)
        if expected is not None and actual != expected:
            raise DownloadError(f"{archive_path}: sha256 {actual} does not match the expected {expected} "
                                f"(from {recorded.name} if not published); delete the archive and download it again")
        _extract(archive_path, list(paths.values()))
    except DownloadError as error:
        if fetched:  # an archive that failed to verify or extract must not be taken from the cache next time
            archive_path.unlink(missing_ok=True)
        raise DownloadError(f"{error}; download it elsewhere and put {archive.files[0]} and {archive.files[1]} "
                            f"(or {archive.filename}) in {folder}/") from None
    if expected is None:
        recorded.write_text(f"{actual}  {archive_path.name}\n")
    return paths
