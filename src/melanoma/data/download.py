"""Fetch public data sets for users with internet: resumable, verified, unpacked in place.

Each file is downloaded to ``NAME.part`` (continued with an HTTP Range request when a
previous run was interrupted), checked against its known size and SHA-256 (or, where
those are not published, the size the server announces), then renamed into place. Zips
are unpacked into a hidden ``*.partial`` folder that is renamed when complete, so a
folder that looks finished always is. ``download.json`` beside the data records the
URL, size and SHA-256 of every file fetched.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from melanoma.errors import MelanomaError
from melanoma.files import sha256_file, utc_now

CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60
RECORD_NAME = "download.json"


@dataclass(frozen=True)
class RemoteFile:
    """One file of a data set on its public host."""

    name: str
    size: int | None = None  # bytes, where known
    sha256: str | None = None  # where known
    unpack_to: str | None = None  # for zips: the folder they contain, renamed into place when complete


@dataclass(frozen=True)
class RemoteDataset:
    base_url: str
    files: tuple[RemoteFile, ...]
    manual: str  # how to get the data by hand


# The two CSVs' sizes and checksums are those of the official files as kept, unmodified, in
# ../shared/data/isic2019. The image zip's are not published: it is checked against the
# size the server announces, and its SHA-256 is computed and recorded in download.json.
ISIC2019 = RemoteDataset(
    base_url="https://isic-challenge-data.s3.amazonaws.com/2019",
    files=(
        RemoteFile(
            "ISIC_2019_Training_GroundTruth.csv",
            size=1_291_479,
            sha256="aa88e9638fe4df9ef330dc4ba22fa4bd475c44af692fffb870c73091ab25cdcd",
        ),
        RemoteFile(
            "ISIC_2019_Training_Metadata.csv",
            size=1_214_351,
            sha256="d93994a8ed201d474de9a7af7e17ec30929cbc4a5220659ecbde17cbe83e9316",
        ),
        RemoteFile("ISIC_2019_Training_Input.zip", unpack_to="ISIC_2019_Training_Input"),
    ),
    manual=(
        "download ISIC_2019_Training_Input.zip, ISIC_2019_Training_GroundTruth.csv and "
        "ISIC_2019_Training_Metadata.csv from https://challenge.isic-archive.com/data/#2019, "
        "put them in {dest} and unzip the zip there (giving {dest}/ISIC_2019_Training_Input/*.jpg)"
    ),
)
DATASETS = {"isic2019": ISIC2019}


@dataclass
class DownloadedFile:
    name: str
    url: str
    size: int
    sha256: str | None  # None where the file was already unpacked by an earlier run
    action: str  # "downloaded", "resumed", "already there", "unpacked"


def download_dataset(
    name: str,
    dest: Path,
    *,
    base_url: str | None = None,
    keep_zip: bool = False,
    progress: bool = True,
) -> list[DownloadedFile]:
    """Download data set ``name`` (see :data:`DATASETS`) into ``dest``, in the layout its
    reader expects. Re-running continues an interrupted download and skips what is done."""
    if name not in DATASETS:
        raise MelanomaError(f"Unknown data set {name!r}: choose one of {', '.join(DATASETS)}.")
    dataset = DATASETS[name]
    return download_files(
        dataset.files,
        dest,
        base_url=base_url or dataset.base_url,
        manual=dataset.manual,
        keep_zip=keep_zip,
        progress=progress,
    )


def download_files(
    files: tuple[RemoteFile, ...],
    dest: Path,
    *,
    base_url: str,
    manual: str,
    keep_zip: bool = False,
    progress: bool = True,
) -> list[DownloadedFile]:
    """Fetch ``base_url/NAME`` for each file into ``dest``, verify, unpack zips."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MelanomaError(f"Cannot create the download folder {dest}: {exc.strerror or exc}.") from None
    if not os.access(dest, os.W_OK):
        raise MelanomaError(f"The download folder {dest} is not writable.")
    results = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        disable=not progress,
    ) as bar:
        for remote in files:
            url = f"{base_url.rstrip('/')}/{remote.name}"
            if remote.unpack_to and (dest / remote.unpack_to).is_dir():
                results.append(DownloadedFile(remote.name, url, 0, None, "already there"))
                continue
            result = _fetch(remote, url, dest, bar, manual.format(dest=dest))
            if remote.unpack_to:
                _unpack(dest / remote.name, dest, remote.unpack_to, bar)
                if not keep_zip:
                    (dest / remote.name).unlink()
                result.action += ", unpacked"
            results.append(result)
    _record(dest, [r for r in results if r.sha256 is not None])
    return results


def _fetch(remote: RemoteFile, url: str, dest: Path, bar: Progress, manual: str) -> DownloadedFile:
    final, part = dest / remote.name, dest / f"{remote.name}.part"
    if final.is_file():
        size, digest = final.stat().st_size, sha256_file(final)
        if problem := _mismatch(remote, size, digest):
            raise MelanomaError(f"{final} is not the expected file: {problem}.", hint="Delete it and re-run to download it again.")
        return DownloadedFile(remote.name, url, size, digest, "already there")

    done = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and done:  # the part file already holds everything
            return _finish(remote, url, part, final, done, "resumed")
        raise MelanomaError(f"Downloading {url} failed: HTTP {exc.code} {exc.reason}.", hint=f"Or {manual}.") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MelanomaError(
            f"Cannot reach {url} ({reason}): there seems to be no internet access.",
            hint=f"Re-run `melanoma download` where there is (it resumes), or {manual}.",
        ) from None

    with response:
        resumed = response.status == 206
        if not resumed:
            done = 0  # the server ignored the range: start again
        total = _total_size(response, done)
        if remote.size is not None and total is not None and total != remote.size:
            raise MelanomaError(f"{url}: the server announces {total:,} bytes, expected {remote.size:,}.", hint=f"Or {manual}.")
        task = bar.add_task(remote.name, total=total or remote.size, completed=done)
        try:
            with open(part, "ab" if resumed else "wb") as sink:
                _copy(response, sink, lambda n: bar.advance(task, n))
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as exc:
            raise MelanomaError(
                f"The download of {url} was interrupted ({exc}).", hint="Re-run the same command: it resumes where it stopped."
            ) from None
        except OSError as exc:
            raise MelanomaError(f"Cannot write {part}: {exc.strerror or exc} (is the disk full?).") from None
        size = part.stat().st_size
        if total is not None and size != total:
            raise MelanomaError(
                f"The download of {url} stopped at {size:,} of {total:,} bytes.",
                hint="Re-run the same command: it resumes where it stopped.",
            )
    return _finish(remote, url, part, final, size, "resumed" if resumed else "downloaded")


def _finish(remote: RemoteFile, url: str, part: Path, final: Path, size: int, action: str) -> DownloadedFile:
    digest = sha256_file(part)
    if problem := _mismatch(remote, size, digest):
        part.unlink()  # resuming a corrupt file would fail again: start afresh next time
        raise MelanomaError(f"The download of {url} is corrupt: {problem}; it was deleted.", hint="Re-run to download it again.")
    os.replace(part, final)
    return DownloadedFile(remote.name, url, size, digest, action)


def _total_size(response: http.client.HTTPResponse, done: int) -> int | None:
    """The full file's size from Content-Range ("bytes 100-199/200") or Content-Length."""
    content_range = response.headers.get("Content-Range", "")
    if "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return done + int(length) if length is not None else None


def _copy(source: BinaryIO, sink: BinaryIO, advance: Callable[[int], object]) -> None:
    while chunk := source.read(CHUNK_BYTES):
        sink.write(chunk)
        advance(len(chunk))


def _mismatch(remote: RemoteFile, size: int, digest: str) -> str | None:
    """What is wrong with a file of this size and SHA-256, or None."""
    if remote.size is not None and size != remote.size:
        return f"{size:,} bytes, expected {remote.size:,}"
    if remote.sha256 is not None and digest != remote.sha256:
        return f"checksum mismatch (SHA-256 {digest}, expected {remote.sha256})"
    return None


def _unpack(zip_path: Path, dest: Path, folder: str, bar: Progress) -> None:
    """Extract into ``.FOLDER.partial`` and rename the folder into place when complete."""
    staging = dest / f".{folder}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = archive.infolist()
            task = bar.add_task(f"unpacking {zip_path.name}", total=sum(m.file_size for m in members))
            for member in members:
                archive.extract(member, staging)  # ZipFile.extract refuses "../" and absolute names
                bar.advance(task, member.file_size)
    except zipfile.BadZipFile as exc:
        shutil.rmtree(staging, ignore_errors=True)
        zip_path.unlink()
        raise MelanomaError(f"{zip_path} is not a valid zip ({exc}); it was deleted.", hint="Re-run to download it again.") from None
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise MelanomaError(f"Cannot unpack {zip_path} into {dest}: {exc.strerror or exc} (is the disk full?).") from None
    # The official zip holds FOLDER/...; accept a zip of bare files as well.
    inner = staging / folder
    if inner.is_dir():
        os.replace(inner, dest / folder)
        shutil.rmtree(staging)
    else:
        os.replace(staging, dest / folder)


def _record(dest: Path, downloaded: list[DownloadedFile]) -> None:
    """Merge the fetched files' URL, size and SHA-256 into dest/download.json (atomically)."""
    path = dest / RECORD_NAME
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or damaged: the files themselves are verified
        record = {}
    now = utc_now()
    for item in downloaded:
        record[item.name] = {"url": item.url, "size": item.size, "sha256": item.sha256, "verified": now}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
