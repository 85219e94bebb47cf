"""`melanoma download` through the real code path, against an HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from melanoma.cli import app
from melanoma.data.download import (
    ISIC2019,
    RemoteFile,
    download_dataset,
    download_files,
)
from melanoma.data.sources import read_dataset
from melanoma.errors import MelanomaError

ZIP_NAME = "ISIC_2019_Training_Input.zip"
IMAGES = "ISIC_2019_Training_Input"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` from memory, with ``Range: bytes=N-`` support (unless
    ``server.honour_range`` is off) and an optional connection cut (``server.cut_after``)."""

    server: FileServer

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        requested = self.headers.get("Range")
        self.server.requests.append((name, requested))
        data = self.server.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = int(requested.removeprefix("bytes=").split("-")[0]) if requested and self.server.honour_range else 0
        if start >= len(data) and requested:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.server.cut_after is not None:  # simulate a dropped connection, once
            body, self.server.cut_after = body[: self.server.cut_after], None
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class FileServer(http.server.ThreadingHTTPServer):
    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        self.honour_range = True
        self.cut_after: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/2019"


@pytest.fixture
def serve() -> Iterator:
    servers = []

    def start(files: dict[str, bytes]) -> FileServer:
        server = FileServer(files)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def isic_files(ham_dir: Path, isic2019_csv_dir: Path) -> dict[str, bytes]:
    """The official CSVs and a small image zip made of three real HAM images, laid out as
    the official ISIC_2019_Training_Input.zip is (a top folder holding the images)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted((ham_dir / "HAM10000_images_part_1").glob("*.jpg"))[:3]:
            archive.write(path, f"{IMAGES}/{path.name}")
        archive.writestr(f"{IMAGES}/LICENSE.txt", "CC BY-NC 4.0\n")
    files = {name: (isic2019_csv_dir / name).read_bytes() for name in (f.name for f in ISIC2019.files) if name != ZIP_NAME}
    return {**files, ZIP_NAME: buffer.getvalue()}


@pytest.mark.realdata
def test_download_isic2019_into_the_reader_layout(tmp_path: Path, serve, isic_files: dict[str, bytes]) -> None:
    server = serve(isic_files)
    dest = tmp_path / "raw"
    result = CliRunner().invoke(app, ["download", "isic2019", "--dest", str(dest), "--base-url", server.url])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_Metadata.csv", IMAGES, "download.json"]
    )
    assert len(list((dest / IMAGES).glob("*.jpg"))) == 3
    record = json.loads((dest / "download.json").read_text())
    assert record[ZIP_NAME]["sha256"] == hashlib.sha256(isic_files[ZIP_NAME]).hexdigest()
    dataset = read_dataset(dest, "auto")
    assert dataset.source == "isic2019" and len(dataset.manifest) == 3 and len(dataset.missing) == 25_328

    # A second run finds everything in place and fetches nothing.
    server.requests.clear()
    again = download_dataset("isic2019", dest, base_url=server.url, progress=False)
    assert server.requests == [] and {item.action for item in again} == {"already there"}


@pytest.mark.realdata
def test_interrupted_download_resumes(tmp_path: Path, serve, isic_files: dict[str, bytes]) -> None:
    server = serve(isic_files)
    zip_bytes = isic_files[ZIP_NAME]
    server.cut_after = len(zip_bytes) // 3
    files = (RemoteFile(ZIP_NAME, size=len(zip_bytes), sha256=hashlib.sha256(zip_bytes).hexdigest(), unpack_to=IMAGES),)
    with pytest.raises(MelanomaError) as error:
        download_files(files, tmp_path, base_url=server.url, manual="", progress=False)
    assert "resumes" in error.value.hint
    assert (tmp_path / f"{ZIP_NAME}.part").stat().st_size == len(zip_bytes) // 3
    assert not (tmp_path / IMAGES).exists()

    # A pre-existing half of the file is kept and only the rest is requested.
    (tmp_path / f"{ZIP_NAME}.part").write_bytes(zip_bytes[: len(zip_bytes) // 2])
    (done,) = download_files(files, tmp_path, base_url=server.url, manual="", keep_zip=True, progress=False)
    assert server.requests[-1] == (ZIP_NAME, f"bytes={len(zip_bytes) // 2}-")
    assert done.action == "resumed, unpacked"
    assert (tmp_path / ZIP_NAME).read_bytes() == zip_bytes
    assert len(list((tmp_path / IMAGES).glob("*.jpg"))) == 3
    assert not (tmp_path / f"{ZIP_NAME}.part").exists()


def test_server_without_range_support_restarts_cleanly(tmp_path: Path, serve) -> None:
    data = b"0123456789" * 1000
    server = serve({"data.csv": data})
    server.honour_range = False
    (tmp_path / "data.csv.part").write_bytes(data[:3000])
    files = (RemoteFile("data.csv", size=len(data), sha256=hashlib.sha256(data).hexdigest()),)
    (done,) = download_files(files, tmp_path, base_url=server.url, manual="", progress=False)
    assert done.action == "downloaded" and (tmp_path / "data.csv").read_bytes() == data


def test_complete_part_file_is_finished_without_download(tmp_path: Path, serve) -> None:
    data = b"image,MEL\r\nISIC_0000000,1.0\r\n"
    server = serve({"data.csv": data})
    (tmp_path / "data.csv.part").write_bytes(data)
    files = (RemoteFile("data.csv", sha256=hashlib.sha256(data).hexdigest()),)
    download_files(files, tmp_path, base_url=server.url, manual="", progress=False)
    assert (tmp_path / "data.csv").read_bytes() == data


def test_checksum_mismatch_is_an_error_and_deletes_the_download(tmp_path: Path, serve) -> None:
    server = serve({"data.csv": b"not what was published\n"})
    files = (RemoteFile("data.csv", sha256="0" * 64),)
    with pytest.raises(MelanomaError, match="checksum mismatch"):
        download_files(files, tmp_path, base_url=server.url, manual="", progress=False)
    assert not (tmp_path / "data.csv").exists() and not (tmp_path / "data.csv.part").exists()


def test_announced_size_mismatch_stops_before_downloading(tmp_path: Path, serve) -> None:
    server = serve({"data.csv": b"x" * 100})
    with pytest.raises(MelanomaError, match="announces 100 bytes, expected 99"):
        download_files((RemoteFile("data.csv", size=99),), tmp_path, base_url=server.url, manual="", progress=False)
    assert not (tmp_path / "data.csv.part").exists()


def test_corrupt_zip_leaves_no_folder_that_looks_complete(tmp_path: Path, serve) -> None:
    server = serve({ZIP_NAME: b"PK\x03\x04 this is not really a zip"})
    (tmp_path / f".{IMAGES}.partial").mkdir()  # left by an earlier, interrupted unpack
    with pytest.raises(MelanomaError, match="not a valid zip"):
        download_files((RemoteFile(ZIP_NAME, unpack_to=IMAGES),), tmp_path, base_url=server.url, manual="", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_http_error_and_no_network_are_clear(tmp_path: Path, serve) -> None:
    server = serve({})
    with pytest.raises(MelanomaError, match="HTTP 404"):
        download_dataset("isic2019", tmp_path, base_url=server.url, progress=False)
    closed = f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    with pytest.raises(MelanomaError, match="no internet access") as error:
        download_dataset("isic2019", tmp_path / "x", base_url=closed, progress=False)
    assert "challenge.isic-archive.com" in error.value.hint and str(tmp_path / "x") in error.value.hint
    with pytest.raises(MelanomaError, match="Unknown data set 'isic2018'"):
        download_dataset("isic2018", tmp_path, progress=False)
