"""Downloader against a local HTTP server on 127.0.0.1 serving the real Omniglot zips."""

from __future__ import annotations

import functools
import hashlib
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from episodes import omniglot
from episodes.download import DownloadError, RemoteFile, download_omniglot, fetch_file
from episodes.integrity import ChecksumError, KnownVersion
from episodes.omniglot import BACKGROUND_ZIP, EVALUATION_ZIP, load_omniglot


@dataclass
class _Served:
    """What the test server serves and what it saw."""

    files: dict[str, bytes]
    break_first: set[str] = field(default_factory=set)  # cut these off mid-body once
    honour_range: bool = True
    requests: list[tuple[str, str | None]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        served: _Served = self.server.served
        name = self.path.lstrip("/")
        wanted = self.headers.get("Range")
        served.requests.append((name, wanted))
        if name not in served.files:
            self.send_error(404)
            return
        data = served.files[name]
        match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
        start = int(match[1]) if match and served.honour_range else 0
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in served.break_first:
            served.break_first.discard(name)
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(data_root) -> Iterator[tuple[str, _Served]]:
    """A loopback HTTP server serving the two shared Omniglot zips; yields (base URL, state)."""
    served = _Served(
        {
            name: (data_root / "omniglot" / name).read_bytes()
            for name in (BACKGROUND_ZIP, EVALUATION_ZIP)
        }
    )
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.served = served
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _version(data: bytes) -> KnownVersion:
    return KnownVersion("served copy", len(data), {"md5": hashlib.md5(data).hexdigest()})


def _remote(base: str, served: _Served, name: str) -> RemoteFile:
    return RemoteFile(f"{base}/{name}", _version(served.files[name]))


def test_normal_download(server, tmp_path):
    base, served = server
    dest = tmp_path / EVALUATION_ZIP
    data = served.files[EVALUATION_ZIP]
    assert fetch_file(f"{base}/{EVALUATION_ZIP}", dest, _version(data), backoff_s=0) == dest
    assert dest.read_bytes() == data
    assert served.requests == [(EVALUATION_ZIP, None)]
    assert list(tmp_path.iterdir()) == [dest]


@pytest.mark.parametrize("honour_range", [True, False])
def test_broken_transfer_is_resumed(server, tmp_path, honour_range):
    base, served = server
    served.break_first.add(EVALUATION_ZIP)
    served.honour_range = honour_range
    files = {EVALUATION_ZIP: _remote(base, served, EVALUATION_ZIP)}
    (path,) = download_omniglot(tmp_path, [EVALUATION_ZIP], files=files, backoff_s=0)
    assert path == tmp_path / "omniglot" / EVALUATION_ZIP
    assert path.read_bytes() == served.files[EVALUATION_ZIP]
    half = len(served.files[EVALUATION_ZIP]) // 2
    assert served.requests == [(EVALUATION_ZIP, None), (EVALUATION_ZIP, f"bytes={half}-")]
    assert not path.with_name(path.name + ".part").exists()


def test_wrong_checksum_leaves_nothing(server, tmp_path):
    base, served = server
    wrong = KnownVersion("original release", len(served.files[BACKGROUND_ZIP]), {"md5": "0" * 32})
    files = {BACKGROUND_ZIP: RemoteFile(f"{base}/{BACKGROUND_ZIP}", wrong)}
    with pytest.raises(ChecksumError) as error:
        download_omniglot(tmp_path, files=files, backoff_s=0)
    message = str(error.value)
    dest = tmp_path / "omniglot" / BACKGROUND_ZIP
    assert str(dest) in message and "0" * 32 in message and "by hand" in message
    assert list((tmp_path / "omniglot").iterdir()) == []


def test_no_server_says_where_to_put_the_files(tmp_path):
    with socket.socket() as probe:  # a loopback port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    version = KnownVersion("original release", 1, {"md5": "0" * 32})
    files = {
        name: RemoteFile(f"http://127.0.0.1:{port}/{name}", version) for name in ("a.zip", "b.zip")
    }
    with pytest.raises(DownloadError) as error:
        download_omniglot(tmp_path, files=files, attempts=2, backoff_s=0, timeout_s=5)
    message = str(error.value)
    assert "after 2 attempts" in message and "Without network access" in message
    for name in ("a.zip", "b.zip"):
        assert f"{tmp_path / 'omniglot' / name}  <- http://127.0.0.1:{port}/{name}" in message


def test_missing_url_is_not_retried(server, tmp_path):
    base, served = server
    version = KnownVersion("original release", 1, {"md5": "0" * 32})
    with pytest.raises(DownloadError, match="HTTP 404.*check the URL"):
        fetch_file(f"{base}/nothing.zip", tmp_path / "nothing.zip", version, backoff_s=0)
    assert len(served.requests) == 1


def test_load_with_download_fetches_missing_zip(
    server, data_root, tmp_path, omniglot_cache_dir, monkeypatch
):
    base, served = server
    files = {EVALUATION_ZIP: _remote(base, served, EVALUATION_ZIP)}
    local = functools.partial(download_omniglot, files=files, backoff_s=0)
    monkeypatch.setattr(omniglot, "download_omniglot", local)
    root = tmp_path / "root"
    with pytest.raises(FileNotFoundError):
        load_omniglot(root, "evaluation", cache_dir=omniglot_cache_dir)
    classes = load_omniglot(root, "evaluation", cache_dir=omniglot_cache_dir, download=True)
    assert classes.num_classes == 659
    assert (root / "omniglot" / EVALUATION_ZIP).read_bytes() == served.files[EVALUATION_ZIP]
    assert served.requests == [(EVALUATION_ZIP, None)]


def test_present_files_are_not_fetched(server, tmp_path):
    base, served = server
    folder = tmp_path / "omniglot"
    folder.mkdir()
    (folder / EVALUATION_ZIP).write_bytes(b"placed by hand")
    files = {EVALUATION_ZIP: _remote(base, served, EVALUATION_ZIP)}
    assert download_omniglot(tmp_path, files=files) == [folder / EVALUATION_ZIP]
    assert served.requests == []


def test_unknown_file_name(tmp_path):
    with pytest.raises(ValueError, match="unknown Omniglot files.*images_background.zip"):
        download_omniglot(tmp_path, ["images_test.zip"])
