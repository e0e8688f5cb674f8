"""Shared fixtures."""

import functools
import http.server
import os
import threading

import pytest


def pytest_configure(config):
    """Under pytest-xdist (-n 2), one intra-op thread per worker: the workers share the cores, and spinning OpenMP
    threads of two processes on two cores slow both many times over (the `one_thread` fixture's reason)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture()
def http_dir(tmp_path):
    """(folder, base URL): files written to `folder` are served on 127.0.0.1."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def one_thread():
    """One intra-op thread: on a busy 2-core machine two threads per process spin against each other (40x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def count_evaluations(monkeypatch):
    """Counts `evaluation.score` calls (fid.py sweep, robustness); set `fail_at` to raise SystemExit(143) (a SIGTERM)
    at that call instead."""
    from training import evaluation

    calls = {"count": 0, "fail_at": None}
    real = evaluation.score

    def counted(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == calls["fail_at"]:
            raise SystemExit(143)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "score", counted)
    return calls
