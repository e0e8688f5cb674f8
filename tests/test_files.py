"""Atomic writes and downloads, against a real HTTP server on 127.0.0.1 serving small stand-ins."""

import hashlib
import http.server
import threading

import pytest

from dnnlib import util

PAYLOAD = bytes(range(256)) * 1000  # 256 kB stand-in for a detector or checkpoint


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /ok.bin; /flaky.bin fails twice first; /short.bin lies about its length."""

    hits: dict = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if self.path == "/flaky.bin" and self.hits[self.path] <= 2:
            self.send_error(503)
            return
        if self.path == "/missing.bin":
            self.send_error(404)
            return
        body = PAYLOAD[: len(PAYLOAD) // 2] if self.path == "/short.bin" else PAYLOAD
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    _Handler.hits = {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _cached_files(cache):
    return sorted(p.name for p in cache.rglob("*") if p.is_file())


def test_download_once_then_from_cache(server, tmp_path):
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    first = util.download(f"{server}/ok.bin", sha256=sha, cache=tmp_path, progress=False)
    assert first.read_bytes() == PAYLOAD
    again = util.download(f"{server}/ok.bin", sha256=sha, cache=tmp_path, progress=False)
    assert again == first and _Handler.hits["/ok.bin"] == 1


def test_download_retries_with_backoff(server, tmp_path):
    path = util.download(f"{server}/flaky.bin", cache=tmp_path, backoff_s=0.01, progress=False)
    assert path.read_bytes() == PAYLOAD and _Handler.hits["/flaky.bin"] == 3


def test_truncated_body_is_never_left_in_the_cache(server, tmp_path):
    with pytest.raises(util.DownloadError, match="after 2 attempts"):
        util.download(f"{server}/short.bin", cache=tmp_path, attempts=2, backoff_s=0.01, progress=False)
    assert _cached_files(tmp_path) == []


def test_wrong_checksum_is_refused_at_once(server, tmp_path):
    with pytest.raises(util.DownloadError, match="SHA-256"):
        util.download(f"{server}/ok.bin", sha256="0" * 64, cache=tmp_path, progress=False)
    assert _cached_files(tmp_path) == [] and _Handler.hits["/ok.bin"] == 1


def test_http_error_names_the_address(server, tmp_path):
    with pytest.raises(util.DownloadError, match="missing.bin"):
        util.download(f"{server}/missing.bin", cache=tmp_path, attempts=1, progress=False)


def test_local_path_passes_files_and_refuses_missing_ones(server, tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x")
    assert util.local_path(str(f)) == f
    with pytest.raises(ValueError, match="no such file"):
        util.local_path(tmp_path / "nope.bin")
    assert util.local_path(f"{server}/ok.bin", cache=tmp_path / "c", progress=False).read_bytes() == PAYLOAD


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "state.bin"
    with util.atomic_write(target) as f:
        f.write(b"old")
    with pytest.raises(RuntimeError):
        with util.atomic_write(target) as f:
            f.write(b"new, half written")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]
