"""A run directory: its files, its name, and the one process allowed to write it.

``output_dir/<name>-<YYYYmmdd-HHMMSS>[-<n>]`` holds ``config.toml`` (the resolved
config), ``metrics.jsonl`` (one line per round, each written whole as the round ends; its
``round`` counts the rounds done, 1 after the first, as the plots and rounds-to-threshold do;
``time/finished_at`` says when), ``evaluation.json`` (per-client numbers of the last
evaluation), ``evaluations.jsonl`` (every evaluation's, one line each), ``checkpoint.pt``
(see ``fedmeta.experiment.checkpoint``), ``provenance.json`` (versions, commit, CPU and time
of the process that started the run and of each that resumed it), and ``.lock`` while a
process writes it. A process writes the directory only while it holds ``.lock`` locked, so two runs never append to
one ``metrics.jsonl``; the lock is the kernel's and ends with its holder, so a killed
run leaves no stale lock (its ``.lock`` file, unlocked, is taken over by the next).
Every write that fails (a full disk, a read-only directory) raises ``WriteError`` naming
the file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator, NamedTuple

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
EVALUATION = "evaluation.json"
EVALUATIONS = "evaluations.jsonl"
"""Every evaluation's per-client numbers, one line each: what a report averages over the last few evaluations."""
TUNED_EVALUATION = "tuned_evaluation.json"
"""``fedmeta reproduce finetune``'s held-out evaluation with fine-tuning chosen on training clients, and the choice."""
CHECKPOINT = "checkpoint.pt"
PROVENANCE = "provenance.json"
LOCK = ".lock"

_NAME = re.compile(r"(?P<name>.+)-(?P<stamp>\d{8}-\d{6})(?:-(?P<number>\d+))?")


class WriteError(OSError, ValueError):
    """A file of a run directory could not be written; the message names it and the system's reason.

    An OSError, as what failed was the system's write; a ValueError too, as the user can
    fix it (free space, make the directory writable), so the CLI reports it in one line.
    """


class RunDirBusy(ValueError):
    """Another process holds the run directory's lock."""


class RunDirName(NamedTuple):
    """The parts of a run directory's name; ``number`` tells apart runs started in the same second."""

    name: str
    stamp: str
    number: int

    @property
    def order(self) -> tuple[str, int]:
        """Sorts runs of one name by when they started."""
        return self.stamp, self.number


def parse_run_dir_name(dirname: str) -> RunDirName | None:
    """The name, timestamp and number of ``<name>-<YYYYmmdd-HHMMSS>[-<n>]``, or None for another name."""
    match = _NAME.fullmatch(dirname)
    if match is None:
        return None
    return RunDirName(match["name"], match["stamp"], int(match["number"] or 1))


def config_path(run_dir: Path) -> Path:
    return run_dir / CONFIG


def metrics_path(run_dir: Path) -> Path:
    return run_dir / METRICS


def evaluation_path(run_dir: Path) -> Path:
    return run_dir / EVALUATION


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT


def provenance_path(run_dir: Path) -> Path:
    return run_dir / PROVENANCE


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turns an OSError of writing ``path`` into a WriteError naming it: the user can free space or fix permissions."""
    try:
        yield
    except WriteError:
        raise  # already names its file (a write inside a write of the same file)
    except OSError as error:
        raise WriteError(f"{path}: cannot write ({error.strerror or error})") from None


def _fsync_directory(directory: Path) -> None:
    """Makes a rename in ``directory`` durable; POSIX only (Windows cannot open directories)."""
    if os.name == "posix":
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def replace_atomically(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Writes ``path`` through a side file that is fsynced and renamed over it.

    Readers, and a run resumed after a crash, see the old file or the new one, whole; a
    failed write leaves the old one and no side file.
    """
    partial = path.with_name(path.name + ".partial")
    with writing(path):
        try:
            with open(partial, "wb") as file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _fsync_directory(path.parent)


def new_run_dir(output_dir: str | Path, name: str) -> Path:
    """Creates ``output_dir/<name>-<timestamp>``, with a number if that already exists."""
    base = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, number = Path(output_dir) / base, 1
    try:
        while run_dir.exists():
            number += 1
            run_dir = run_dir.with_name(f"{base}-{number}")
        run_dir.mkdir(parents=True)
    except OSError as error:  # a file in the way, no permission, a full disk, a name too long: the user can fix each
        raise ValueError(f"output_dir = {str(output_dir)!r}: cannot create {run_dir} "
                         f"({error.strerror or error})") from None
    return run_dir


def write_config(run_dir: Path, text: str) -> None:
    """Writes ``config.toml`` whole or not at all, so a full disk leaves no empty config behind."""
    replace_atomically(config_path(run_dir), lambda file: file.write(text.encode()))


def _holder_pid(descriptor: int, patience: float = 2.0) -> str:
    """The PID the lock's holder wrote in the lock file; it writes it just after locking, so wait a moment for it."""
    deadline = time.monotonic() + patience
    while True:
        holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
        if holder or time.monotonic() > deadline:
            return holder or "unknown"
        time.sleep(0.01)


def _open_locked(path: Path) -> int:
    """A descriptor of ``path``, locked, and still the file named ``path`` (a releasing holder unlinks it)."""
    while True:
        with writing(path):
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(descriptor)
                raise WriteError(f"{path}: cannot lock ({error.strerror})") from None
            holder = _holder_pid(descriptor)
            os.close(descriptor)
            raise RunDirBusy(f"{path.parent}: another fedmeta process (PID {holder}) is writing this run "
                             "directory; wait for it to end, or stop it, then try again") from None
        try:
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                return descriptor
        except FileNotFoundError:
            pass
        os.close(descriptor)  # locked a file its holder had just removed: take the one there now


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Holds the run directory's lock: the caller is its only writer until the block ends.

    A POSIX record lock (``lockf``): the kernel drops it when its holder exits, however it
    dies, and, unlike ``flock``, worker processes forked by the holder do not inherit it,
    so a killed run's directory can be resumed at once. The holder's PID is written in the
    lock file for the message another process gets; the file is removed on release.

    Raises:
        RunDirBusy: another process holds the lock.
        WriteError: the directory is read-only or full.
    """
    path = run_dir / LOCK
    descriptor = _open_locked(path)
    try:
        with writing(path):
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked, so no one takes a file about to vanish
        os.close(descriptor)  # releases the lock


def open_metrics(run_dir: Path) -> IO[bytes]:
    """``metrics.jsonl`` opened for appending, unbuffered: a line is on its way to disk once appended."""
    path = metrics_path(run_dir)
    with writing(path):
        return open(path, "ab", buffering=0)


def append_metrics(file: IO[bytes], row: dict[str, Any]) -> None:
    """Appends the row as one JSON line, so a crash leaves at most a torn last line behind a checkpoint."""
    line = memoryview((json.dumps(row) + "\n").encode())
    with writing(Path(file.name)):
        while line:
            line = line[file.write(line):]


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> int:
    """Writes ``metrics.jsonl`` whole (atomically) and returns its size in bytes."""
    lines = "".join(json.dumps(row) + "\n" for row in rows).encode()
    replace_atomically(metrics_path(run_dir), lambda file: file.write(lines))
    return len(lines)


def _parse_lines(path: Path, text: str) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (or ``evaluations.jsonl``) text; refused unless each is a JSON record and
    their rounds increase."""
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not a JSON record ({error.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            raise ValueError(f"{path}: line {number} is not a metrics record (no integer 'round')")
        if rows and row["round"] <= rows[-1]["round"]:
            raise ValueError(f"{path}: line {number} holds round {row['round']} after round {rows[-1]['round']}; "
                             "rounds that repeat or go backwards mean two processes wrote this run at once, "
                             "so its metrics cannot be trusted")
        rows.append(row)
    return rows


def _counted_from_zero(rows: list[Any]) -> bool:
    """Whether the rows number rounds from 0, as fedmeta did before ``round`` counted rounds done."""
    return bool(rows) and isinstance(rows[0], dict) and rows[0].get("round") == 0


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every round's row of the run directory's ``metrics.jsonl``, in order, ``round`` counting rounds done.

    A file an older fedmeta wrote, counting from 0, is read with its rounds moved up by one,
    so its plots, history and reports number rounds as a new run's do.
    """
    path = metrics_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS} here; is it a fedmeta run directory?")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    rows = _parse_lines(path, text)
    if _counted_from_zero(rows):
        return [{**row, "round": row["round"] + 1} for row in rows]
    return rows


def cut_metrics(run_dir: Path, offset: int, rounds_done: int) -> list[dict[str, Any]]:
    """Cuts ``metrics.jsonl`` back to a checkpoint's ``offset`` bytes and returns their rows.

    Lines written after the checkpoint (whole, or torn by the crash) are dropped: the
    resumed run writes them again, so none is duplicated or left half-written.
    """
    path = metrics_path(run_dir)
    size = path.stat().st_size if path.is_file() else 0
    if size < offset:
        raise ValueError(f"{path}: {size} bytes, but the checkpoint counts {offset} bytes of metrics for "
                         f"{rounds_done} rounds; the file was cut or replaced")
    with writing(path), open(path, "r+b") as file:
        kept = file.read(offset)
        try:
            rows = [json.loads(line) for line in kept.decode().splitlines()]
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError both are
            raise ValueError(f"{path}: the first {offset} bytes are not the checkpoint's metrics lines "
                             f"({error})") from None
        if _counted_from_zero(rows):
            raise ValueError(f"{path}: rounds counted from 0, as an older fedmeta wrote them; this version counts "
                             "rounds done and cannot continue the run (it can still evaluate, plot and report it), "
                             "so start it again")
        if [row.get("round") if isinstance(row, dict) else None for row in rows] != list(range(1, rounds_done + 1)):
            raise ValueError(f"{path}: the first {offset} bytes do not hold rounds 1 to {rounds_done}, "
                             "one line each, as the checkpoint records")
        file.truncate(offset)
        os.fsync(file.fileno())
    return rows


def _write_json(path: Path, data: dict[str, Any]) -> None:
    replace_atomically(path, lambda file: file.write(json.dumps(data, indent=1).encode()))


def write_evaluation(run_dir: Path, evaluation: dict[str, Any]) -> None:
    _write_json(evaluation_path(run_dir), evaluation)


def append_evaluation(run_dir: Path, evaluation: dict[str, Any]) -> None:
    """Appends one evaluation (with its ``round``) to ``evaluations.jsonl`` as one line."""
    with writing(run_dir / EVALUATIONS), open(run_dir / EVALUATIONS, "ab") as file:
        append_metrics(file, evaluation)


def read_evaluations(run_dir: Path) -> list[dict[str, Any]]:
    """Every evaluation of the run in order, ``[]`` for a run made before ``evaluations.jsonl`` was written."""
    path = run_dir / EVALUATIONS
    return _parse_lines(path, path.read_text()) if path.is_file() else []


def cut_evaluations(run_dir: Path, rounds_done: int) -> None:
    """Drops the evaluations after a checkpoint's ``rounds_done`` (or torn by a crash): the resumed run redoes them."""
    path = run_dir / EVALUATIONS
    if not path.is_file():
        return
    kept = []
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            row = json.loads(line)
        except ValueError:
            break  # a torn line is the last one written
        if not line.endswith(b"\n") or row.get("round", rounds_done + 1) > rounds_done:
            break
        kept.append(line)
    replace_atomically(path, lambda file: file.write(b"".join(kept)))


def write_tuned_evaluation(run_dir: Path, evaluation: dict[str, Any]) -> None:
    _write_json(run_dir / TUNED_EVALUATION, evaluation)


def read_tuned_evaluation(run_dir: Path) -> dict[str, Any] | None:
    """``write_tuned_evaluation``'s numbers, None where the run has none."""
    path = run_dir / TUNED_EVALUATION
    return json.loads(path.read_bytes()) if path.is_file() else None


def read_evaluation(run_dir: Path) -> dict[str, Any]:
    """The last evaluation's per-client numbers and summaries."""
    path = evaluation_path(run_dir)
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_dir}: no {EVALUATION} here; the run has not finished") from None
    except ValueError as error:
        raise ValueError(f"{path}: not a JSON evaluation ({error})") from None


def read_provenance(run_dir: Path) -> dict[str, Any]:
    """``{"started": record, "resumed": [record, ...]}``; ``started`` is None for a run begun before provenance."""
    path = provenance_path(run_dir)
    try:
        provenance = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_dir}: no {PROVENANCE} here; an older fedmeta started this run") from None
    except ValueError as error:
        raise ValueError(f"{path}: not a JSON provenance record ({error})") from None
    if not (isinstance(provenance, dict) and isinstance(provenance.get("resumed"), list)):
        raise ValueError(f"{path}: not a provenance record (expected 'started' and a list 'resumed')")
    return provenance


def add_provenance(run_dir: Path, record: dict[str, Any], *, resumed: bool) -> None:
    """Records the process that starts the run, or one that resumes it, in ``provenance.json``."""
    if not resumed:
        provenance = {"started": record, "resumed": []}
    elif provenance_path(run_dir).is_file():
        provenance = read_provenance(run_dir)
        provenance["resumed"].append(record)
    else:  # begun by a fedmeta that kept no provenance
        provenance = {"started": None, "resumed": [record]}
    replace_atomically(provenance_path(run_dir),
                       lambda file: file.write(json.dumps(provenance, indent=1).encode()))
