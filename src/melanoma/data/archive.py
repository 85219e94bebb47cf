"""The prepared archive: preprocessed images as one memory-mapped uint8 array.

An archive is a folder (layout in docs/architecture.md): ``images.npy`` (N, S, S, 3),
``manifest.csv`` (one row per image, in row order), ``skipped.csv`` (images that could not
be used, with the reason), ``missing.csv`` (label rows without an image file) and
``header.json``, written last (after ``DATASET_CARD.md``, the archive described for people).

:func:`build_archive` works in ``<out>.partial/`` and renames it to ``<out>`` when done,
so an interrupted run never leaves something that looks complete. Worker processes
decode images and write their rows straight into the memory-mapped ``images.npy``; the
main process records which rows are done in ``progress.npz`` every few seconds, so that
running again with the same inputs continues where the last run stopped.

The folders it makes (``<out>.partial/``, the archive, and ``<out>.old/`` while an archive
is replaced) hold a marker file: ``<out>.partial/`` and ``<out>.old/`` are deleted only with
it, and anything else under those names stops the run. While a run writes, it holds a lock
on ``<out>.partial/prepare.lock``, so a second run on the same ``--out`` stops at once.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import mmap
import multiprocessing
import os
import platform
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, TimeElapsedColumn

from melanoma.data.card import write_dataset_card
from melanoma.data.preprocess import PreprocessParams, load_image
from melanoma.data.sources import MANIFEST_COLUMNS, Dataset
from melanoma.data.splits import SPLITS, grouped_split, split_by_condition
from melanoma.errors import DataError, ImageError, MelanomaError
from melanoma.files import fsync_path, sha256_file, utc_now, write_json, write_text
from melanoma.provenance import git_state

FORMAT_VERSION = 1
IMAGES_FILE = "images.npy"
MANIFEST_FILE = "manifest.csv"
HEADER_FILE = "header.json"
SKIPPED_FILE = "skipped.csv"
MISSING_FILE = "missing.csv"
# Only in <out>.partial/: what the partial images.npy was built from, and how far it got.
FINGERPRINT_FILE = "fingerprint.txt"
PROGRESS_FILE = "progress.npz"
# In every folder build_archive makes: only folders with it are ever deleted or replaced.
MARKER_FILE = ".melanoma-prepare"
MARKER_TEXT = "Made by `melanoma prepare`, which may delete or replace this folder.\n"
LOCK_FILE = "prepare.lock"  # in <out>.partial/, locked while a run writes there

PENDING, DONE, SKIPPED = 0, 1, 2
ROWS_PER_TASK = 64
CHECKPOINT_SECONDS = 1.0
COPY_BYTES = 64 * 2**20  # batch size when compacting rows: bounded memory


@dataclass
class ArchiveSummary:
    """What :func:`build_archive` did, for the CLI's table."""

    path: Path
    source: str
    synthetic: bool
    classes: list[str]
    counts: pd.DataFrame  # images per split (rows) x class (columns)
    n_images: int
    skipped: pd.DataFrame  # path, reason
    missing: int  # label rows without an image file (listed in missing.csv)
    resumed_rows: int  # rows an interrupted earlier run had already done
    reused: bool  # an identical archive was already there: nothing was rebuilt
    seconds: float
    notes: list[str] = field(default_factory=list)  # about this build (the data set's are in Dataset.notes)

    @property
    def images_per_second(self) -> float:
        processed = self.n_images + len(self.skipped) - self.resumed_rows
        return processed / self.seconds if self.seconds > 0 and not self.reused else 0.0


@dataclass
class Archive:
    """An opened archive; ``images`` is memory-mapped read-only."""

    path: Path
    images: np.ndarray
    manifest: pd.DataFrame
    header: dict[str, Any]
    classes: list[str]
    labels: np.ndarray  # label_index per row

    def indices(self, split: str) -> np.ndarray:
        """Row numbers of ``"train"``, ``"val"`` or ``"test"``."""
        if split not in SPLITS:
            raise DataError(f"Unknown split {split!r}.", hint=f"Use one of: {', '.join(SPLITS)}.")
        return np.flatnonzero(self.manifest["split"].to_numpy() == split)


def build_archive(
    dataset: Dataset,
    out_dir: Path,
    params: PreprocessParams,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    test_where: str | None,
    workers: int,
    force: bool = False,
    progress: bool = True,
) -> ArchiveSummary:
    """Preprocess every image of ``dataset`` into an archive at ``out_dir``.

    Resumes an interrupted run with the same inputs; an existing complete archive built
    from the same inputs is reused, one built from other inputs needs ``force``.
    Images that cannot be used are skipped and listed in ``skipped.csv``.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    manifest = _manifest_with_splits(dataset, seed, val_fraction, test_fraction, test_where)
    record = {
        "format_version": FORMAT_VERSION,
        "source": dataset.source,
        "synthetic": dataset.source == "synthetic",
        "data_root": str(dataset.root),
        "classes": list(dataset.classes),
        "preprocess": params.to_dict(),
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": None if test_where else test_fraction,
        "test_where": test_where,
    }
    fingerprint = _fingerprint(record, manifest)
    partial = out_dir.with_name(out_dir.name + ".partial")
    resumable = (partial / FINGERPRINT_FILE).is_file()
    with _locked(partial):
        if _existing_archive(out_dir, fingerprint, force):
            return _summary(out_dir, open_archive(out_dir).header, started, resumed_rows=0, reused=True, notes=[])
        _check_made_here(_old(out_dir))  # before the work, not after it
        shape = (len(manifest), params.image_size, params.image_size, 3)
        status, reasons = _open_partial(partial, fingerprint, shape, force)
        resumed_rows = int((status != PENDING).sum())
        notes = []
        if resumable and not resumed_rows:
            notes.append(f"Started over: the interrupted run in {partial} had other inputs or parameters (or --force).")
        _fill_images(partial, manifest["path"].tolist(), params, status, reasons, workers, progress, resumed_rows)

        keep = status == DONE
        if not keep.all():
            _compact(partial / IMAGES_FILE, keep)
        final = manifest.loc[keep].reset_index(drop=True)
        # Files that failed to decode, then entries the reader found unusable (folders, broken links ...).
        skipped = pd.DataFrame(
            [*zip(manifest.loc[~keep, "path"], (reasons[r] for r in np.flatnonzero(~keep))), *dataset.skipped],
            columns=["path", "reason"])
        _write_csv(final, partial / MANIFEST_FILE)
        _write_csv(skipped, partial / SKIPPED_FILE)
        _write_csv(pd.DataFrame({"image_id": dataset.missing}), partial / MISSING_FILE)
        header = {
            **record,
            "n_images": len(final),
            "image_size": params.image_size,
            "class_counts": {c: int((final["label"] == c).sum()) for c in dataset.classes},
            "split_counts": {s: int((final["split"] == s).sum()) for s in SPLITS},
            "split_class_counts": _counts(final, dataset.classes).to_dict(orient="index"),
            "skipped": len(skipped),
            "missing": len(dataset.missing),
            "notes": dataset.notes,
            "sha256": sha256_file(partial / IMAGES_FILE),
            "versions": _versions(),
            "git": git_state(),
            "created": utc_now(),
            "fingerprint": fingerprint,
        }
        for name in (FINGERPRINT_FILE, PROGRESS_FILE):
            (partial / name).unlink()
        write_dataset_card(partial, header, final, skipped, out_dir)
        fsync_path(partial / IMAGES_FILE)  # on the disk before the header that vouches for it
        write_json(partial / HEADER_FILE, header)
        _publish(partial, out_dir)
        return _summary(out_dir, header, started, resumed_rows=resumed_rows, reused=False, notes=notes)


def open_archive(path: Path, *, verify: bool = False) -> Archive:
    """Open a complete archive, images memory-mapped read-only.

    Checks that the header, the images and the manifest agree; ``verify`` also recomputes
    the sha256 of ``images.npy`` (reads the whole file).
    """
    path = Path(path)
    header_path = path / HEADER_FILE
    if not header_path.is_file():
        partial = path.with_name(path.name + ".partial")
        if partial.is_dir():
            raise DataError(f"The archive {path} is incomplete: {partial} holds an interrupted run.",
                            hint="Run `melanoma prepare` again with the same options to finish it.")
        raise DataError(f"{path} is not a prepared archive ({HEADER_FILE} missing).", hint="Run `melanoma prepare` first.")
    try:
        header = json.loads(header_path.read_text())
        images = np.load(path / IMAGES_FILE, mmap_mode="r")
        manifest = pd.read_csv(path / MANIFEST_FILE, dtype={c: str for c in MANIFEST_COLUMNS}, keep_default_na=False,
                               na_values=[""])
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"The archive {path} cannot be read: {exc}", hint="Rebuild it with `melanoma prepare --force`.") from None
    size = header["image_size"]
    expected = (header["n_images"], size, size, 3)
    problems = []
    if images.shape != expected or images.dtype != np.uint8:
        problems.append(f"{IMAGES_FILE} is {images.dtype} {images.shape}, the header says uint8 {expected}")
    if len(manifest) != header["n_images"]:
        problems.append(f"{MANIFEST_FILE} has {len(manifest)} rows, the header says {header['n_images']}")
    if verify and not problems and sha256_file(path / IMAGES_FILE) != header["sha256"]:
        problems.append(f"the sha256 of {IMAGES_FILE} differs from the one recorded in {HEADER_FILE}")
    if problems:
        raise DataError(f"The archive {path} is inconsistent: {'; '.join(problems)}.",
                        hint="Rebuild it with `melanoma prepare --force`.")
    return Archive(path, images, manifest, header, list(header["classes"]), manifest["label_index"].to_numpy(dtype=np.int64))


def read_rows(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A copy of ``images[rows]``; for an archive's memory map, read with plain file reads.

    Indexing the map leaves every page it faults in resident in this process, and the
    kernel maps the read-ahead around each fault with it: 640 random rows at 224 px put
    1.4 GB of the file into RSS, and one epoch would put all of it there. ``pread`` goes
    through the shared page cache instead, so training memory stays flat.
    """
    rows = np.asarray(rows, dtype=np.int64)
    # Only the map itself: a slice of it shares the map but not its offset.
    if not (isinstance(images, np.memmap) and isinstance(images.base, mmap.mmap)):
        return images[rows]
    out = np.empty((len(rows), *images.shape[1:]), dtype=images.dtype)
    row_bytes = out[0].nbytes if len(rows) else 0
    with open(images.filename, "rb", buffering=0) as file:
        for target, row in zip(out, rows.tolist()):
            if not 0 <= row < len(images):
                raise IndexError(f"row {row} is outside the archive's {len(images)} rows")
            if os.preadv(file.fileno(), [target], images.offset + row * row_bytes) != row_bytes:
                raise DataError(f"{images.filename} is shorter than its header says (row {row}).",
                                hint="Rebuild the archive with `melanoma prepare --force`.")
    return out



# --------------------------------------------------------------------------- building


def _manifest_with_splits(dataset: Dataset, seed: int, val_fraction: float, test_fraction: float,
                          test_where: str | None) -> pd.DataFrame:
    table = dataset.manifest
    if test_where:
        split = split_by_condition(table, test_where, val_fraction=val_fraction, seed=seed)
    else:
        split = grouped_split(table["label"], table["group_id"], val_fraction=val_fraction,
                              test_fraction=test_fraction, seed=seed)
    table = table.assign(label_index=table["label"].map(dataset.classes.index), split=split)
    first = ["image_id", "label", "label_index", "group_id", "split", "path"]
    return table[first + [c for c in table.columns if c not in first]].reset_index(drop=True)


def _fingerprint(record: dict[str, Any], manifest: pd.DataFrame) -> str:
    """What the archive is built from: the settings, the rows and each file's size and
    modification time (so that an image changed in place is not taken for the old one)."""
    rows = manifest[["image_id", "label", "group_id", "split", "path"]].to_numpy().tolist()
    files = [_file_version(path) for path in manifest["path"]]
    text = json.dumps({"record": record, "rows": rows, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _file_version(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None  # unreadable: the worker will say why
    return stat.st_size, stat.st_mtime_ns


def _existing_archive(out_dir: Path, fingerprint: str, force: bool) -> bool:
    """True if ``out_dir`` already holds this very archive; refuse to overwrite others."""
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise DataError(f"The output {out_dir} exists and is not a folder.", hint="Choose another --out.")
    header_path = out_dir / HEADER_FILE
    if not header_path.is_file():
        if any(out_dir.iterdir()):
            raise DataError(f"The output folder {out_dir} is not empty and is not an archive.",
                            hint="Choose another --out, or empty that folder.")
        return False
    if force:
        return False
    try:
        same = json.loads(header_path.read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        same = False
    if not same:
        raise DataError(f"{out_dir} already holds an archive built from other data or parameters "
                        "(or an image file changed since: its size or modification time differs).",
                        hint="Pass --force to replace it, or choose another --out.")
    return True


def _old(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".old")


def _check_made_here(folder: Path) -> None:
    """Refuse to go on where ``folder`` exists but was not made by this module (no marker):
    it may hold someone's files. An empty folder holds nothing to lose."""
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir() or folder.is_symlink():
        raise DataError(f"{folder} exists and is not a folder made by `melanoma prepare`; it is left as it is.",
                        hint="Move or delete it yourself, or choose another --out.")
    if not (folder / MARKER_FILE).is_file() and any(folder.iterdir()):
        raise DataError(f"{folder} exists but was not made by `melanoma prepare` (it has no {MARKER_FILE} file): "
                        "it is left as it is.", hint="Move or delete it yourself, or choose another --out.")


@contextmanager
def _locked(partial: Path) -> Iterator[None]:
    """Hold ``partial/prepare.lock`` for the duration, creating ``partial`` (with its
    marker) if needed; a folder made here for nothing (an archive reused, an error) goes."""
    _check_made_here(partial)
    try:
        partial.mkdir(parents=True, exist_ok=True)
        if not (partial / MARKER_FILE).is_file():
            (partial / MARKER_FILE).write_text(MARKER_TEXT)
        fd = os.open(partial / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise DataError(f"Cannot write the archive next to {partial.parent}: {exc.strerror or exc}.",
                        hint="Choose a writable --out folder.") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The other run may have published (moved) the folder between our open and lock.
            moved = os.fstat(fd).st_ino != os.stat(partial / LOCK_FILE).st_ino
        except (BlockingIOError, FileNotFoundError):
            moved = None
        if moved is not False:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise DataError(f"Another `melanoma prepare` (process {owner or 'unknown'}) is writing to {partial}.",
                            hint="Wait for it to finish (or stop it), then run this command again.")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            if partial.is_dir() and {p.name for p in partial.iterdir()} <= {MARKER_FILE, LOCK_FILE}:
                shutil.rmtree(partial)
    finally:
        os.close(fd)


def _open_partial(partial: Path, fingerprint: str, shape: tuple[int, ...], force: bool) -> tuple[np.ndarray, dict[int, str]]:
    """Create (or reuse, for the same inputs) ``<out>.partial/`` with a full-size images.npy.

    Returns the status of every row and the reasons of the skipped ones.
    """
    fingerprint_path = partial / FINGERPRINT_FILE
    same = not force and fingerprint_path.is_file() and fingerprint_path.read_text() == fingerprint
    if same:
        try:
            with np.load(partial / PROGRESS_FILE) as saved:
                status = saved["status"].copy()
                reasons = dict(zip(saved["skipped_rows"].tolist(), saved["skipped_reasons"].tolist()))
            if status.shape == shape[:1] and np.load(partial / IMAGES_FILE, mmap_mode="r").shape == shape:
                return status, reasons
        except (OSError, ValueError, KeyError):
            pass  # nothing usable was saved: start over
    for entry in partial.iterdir():  # start over, keeping the marker and the lock held
        if entry.name not in (MARKER_FILE, LOCK_FILE):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    fingerprint_path.write_text(fingerprint)
    _allocate_images(partial / IMAGES_FILE, shape)
    status = np.zeros(shape[0], dtype=np.uint8)
    _save_progress(partial, status, {})
    return status, {}


def _allocate_images(path: Path, shape: tuple[int, ...]) -> None:
    """Create images.npy with its disk space reserved, so that a full disk shows now, not
    as a crash in the middle of the run."""
    needed = int(np.prod(shape))
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise DataError(f"Not enough free disk space for {path}: it needs {needed / 1e9:.2f} GB, "
                        f"{free / 1e9:.2f} GB are free.", hint="Free some space or choose another --out.")
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    del images
    try:
        with open(path, "r+b") as file:
            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(f"Cannot reserve {needed / 1e9:.2f} GB for {path}: {exc.strerror}.",
                            hint="Free some space or choose another --out.") from None
        # Other errors: the file system cannot reserve space ahead; the check above must do.


def _save_progress(partial: Path, status: np.ndarray, reasons: dict[int, str]) -> None:
    tmp = partial / ("tmp-" + PROGRESS_FILE)  # np.savez adds .npz unless the name ends with it
    rows = sorted(reasons)
    np.savez(tmp, status=status, skipped_rows=np.array(rows, dtype=np.int64),
             skipped_reasons=np.array([reasons[r] for r in rows], dtype=str))
    os.replace(tmp, partial / PROGRESS_FILE)


def _fill_images(partial: Path, paths: list[str], params: PreprocessParams, status: np.ndarray,
                 reasons: dict[int, str], workers: int, progress: bool, resumed_rows: int) -> None:
    """Preprocess the pending rows in worker processes, checkpointing the status."""
    pending = np.flatnonzero(status == PENDING)
    tasks = [pending[i : i + ROWS_PER_TASK].tolist() for i in range(0, len(pending), ROWS_PER_TASK)]
    description = f"Resuming ({resumed_rows:,} done before)" if resumed_rows else "Preparing"
    # forkserver, not fork: the parent may hold TensorFlow threads, which fork would break.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # workers start with OpenCV etc. imported
    last_save = -math.inf  # the first finished task is checkpointed at once, then every few seconds
    columns = (*Progress.get_default_columns(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task(description, total=len(status), completed=resumed_rows)
        if not tasks:
            return
        with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context, initializer=_init_worker,
                                 initargs=(str(partial / IMAGES_FILE), params.to_dict())) as pool:
            futures = [pool.submit(_process_rows, rows, [paths[r] for r in rows]) for rows in tasks]
            try:
                for future in as_completed(futures):
                    try:
                        rows, failures = future.result()
                    except BrokenProcessPool:
                        raise MelanomaError(
                            "A worker process died while preparing images (out of memory, or killed).",
                            hint="Run the same command again to resume; use fewer --workers if memory is short.",
                        ) from None
                    status[rows] = DONE
                    for row, reason in failures:
                        status[row] = SKIPPED
                        reasons[row] = reason
                    bar.advance(task, len(rows))
                    if time.monotonic() - last_save > CHECKPOINT_SECONDS:
                        _save_progress(partial, status, reasons)
                        last_save = time.monotonic()
            finally:
                pool.shutdown(cancel_futures=True)
                _save_progress(partial, status, reasons)


# Per worker process: the memory-mapped images.npy and the parameters.
_worker: dict[str, Any] = {}


def _init_worker(images_path: str, params: dict[str, Any]) -> None:
    import cv2

    # Ctrl-C is for the main process, which lets running tasks finish and saves progress.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)  # one process per core already
    _worker["images"] = np.lib.format.open_memmap(images_path, mode="r+")
    _worker["params"] = PreprocessParams.from_dict(params)


def _process_rows(rows: list[int], paths: list[str]) -> tuple[list[int], list[tuple[int, str]]]:
    """Write the preprocessed images of ``rows``; return the rows and (row, reason) failures."""
    images, params = _worker["images"], _worker["params"]
    failures = []
    for row, path in zip(rows, paths):
        try:
            images[row] = load_image(path, params)
        except ImageError as exc:
            failures.append((row, str(exc).removeprefix(f"{path}: ")))
    return rows, failures


def _compact(path: Path, keep: np.ndarray) -> None:
    """Drop the rows not kept, copying batch by batch (never the whole array in memory)."""
    source = np.load(path, mmap_mode="r")
    tmp = path.with_name("tmp-" + path.name)
    target = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(int(keep.sum()), *source.shape[1:]))
    rows = np.flatnonzero(keep)
    batch = max(1, COPY_BYTES // max(1, source[0].nbytes))
    for start in range(0, len(rows), batch):
        target[start : start + batch] = source[rows[start : start + batch]]
    target.flush()
    del source, target
    os.replace(tmp, path)


def _publish(partial: Path, out_dir: Path) -> None:
    """Put the finished archive in place; an older one (``--force``) is removed after.

    ``<out>.old`` was checked to be absent or made here before the work began."""
    old = _old(out_dir)
    if old.exists():
        shutil.rmtree(old)
    if out_dir.exists():
        os.replace(out_dir, old)
    (partial / LOCK_FILE).unlink()  # the lock stays held (open) until build_archive returns
    os.replace(partial, out_dir)
    fsync_path(out_dir.parent)
    if old.exists():
        shutil.rmtree(old)


# --------------------------------------------------------------------------- records


def _counts(manifest: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    counts = pd.crosstab(manifest["split"], manifest["label"])
    return counts.reindex(index=list(SPLITS), columns=classes, fill_value=0).astype(int)


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    write_text(path, table.to_csv(index=False))


def _versions() -> dict[str, str]:
    import cv2
    import PIL

    import melanoma

    return {"python": platform.python_version(), "melanoma": melanoma.__version__, "numpy": np.__version__,
            "opencv": cv2.__version__, "pandas": pd.__version__, "pillow": PIL.__version__}


def _summary(out_dir: Path, header: dict[str, Any], started: float, *, resumed_rows: int, reused: bool,
             notes: list[str]) -> ArchiveSummary:
    counts = pd.DataFrame.from_dict(header["split_class_counts"], orient="index")
    skipped = pd.read_csv(out_dir / SKIPPED_FILE, dtype=str)
    return ArchiveSummary(
        path=out_dir, source=header["source"], synthetic=header["synthetic"], classes=header["classes"],
        counts=counts.reindex(index=list(SPLITS), columns=header["classes"], fill_value=0), n_images=header["n_images"],
        skipped=skipped, missing=header["missing"], resumed_rows=resumed_rows, reused=reused,
        seconds=time.perf_counter() - started, notes=list(notes),
    )
