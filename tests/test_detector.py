"""The FID / KID / IS feature detector: download, cache, offline paths, safe loading, and its outputs.

No network here: a tiny TorchScript stand-in with the real detector's call signature
`forward(img, return_features=False, use_fp16=False, no_output_bias=False)` (uint8 NCHW in, resized
inside, 2048 features or softmax over 1008 classes out) is built at test time and served from
127.0.0.1 by a server that counts requests and can fail on purpose. Its math is simple enough to
be the oracle: features = ((4x4 block means of the 16x16 image) - 128) / 128 @ P, and
probabilities = softmax(features[:, :1008] (+ b unless no_output_bias)).
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import pickle
import threading

import pytest
import torch

from dnnlib import util
from tests import edm_fixtures as fx
from tests.detector_fixtures import StandIn, script_bytes
from training.checkpoint import legacy
from training.metrics import detector as det

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


class NoFeatures(torch.nn.Module):
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return img.float().mean(dim=[1, 2, 3])


class FlatFeatures(torch.nn.Module):
    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return img.float().mean(dim=[1, 2, 3])  # [B], not [B, F]


@pytest.fixture(scope="module")
def blob() -> bytes:
    return script_bytes(StandIn())


def oracle_features(images: torch.Tensor) -> torch.Tensor:
    """The stand-in's features, computed from its definition without it."""
    blocks = images.to(torch.float64).reshape(len(images), 3, 4, 4, 4, 4).mean(dim=(3, 5))
    return (((blocks - 128) / 128).reshape(len(images), 48) @ StandIn().proj.detach().to(torch.float64)).float()


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, [n, 3, 16, 16], dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# A local server that counts requests and fails on purpose.


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    hits: dict[str, int] = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        kind, _, name = self.path.strip("/").partition("/")
        body = self.files.get(name)
        if body is None or (kind == "flaky" and self.hits[self.path] == 1):
            self.send_error(404 if body is None else 500)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if kind == "short" else body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server(blob):
    _Handler.files, _Handler.hits = {"inception.pt": blob}, {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def offline_env(monkeypatch, tmp_path):
    """No $PFGMPP_DETECTOR from the caller's shell; downloads land in a temporary cache."""
    monkeypatch.delenv(det.ENV_VAR, raising=False)
    monkeypatch.setenv("PFGMPP_CACHE_DIR", str(tmp_path / "cache"))


def cached_files(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------
# Download: once, cached, verified, retried; failures say what to do.


def test_first_download_then_cache_hit(server, tmp_path):
    url = f"{server}/plain/inception.pt"
    first = det.load_detector(url, cache=tmp_path / "c", progress=False)
    second = det.load_detector(url, cache=tmp_path / "c", progress=False)
    assert _Handler.hits == {"/plain/inception.pt": 1}  # the second load made no request
    x = images(3)
    assert torch.equal(first.features(x), second.features(x))
    assert cached_files(tmp_path / "c") == ["inception.pt"]


def test_default_cache_folder_is_dnnlibs(server, tmp_path):
    det.load_detector(f"{server}/plain/inception.pt", progress=False)
    assert cached_files(tmp_path / "cache") == ["inception.pt"]


def test_truncated_body_is_never_cached_and_the_error_says_what_to_do(server, tmp_path):
    url = f"{server}/short/inception.pt"
    with pytest.raises(util.DownloadError) as info:
        det.load_detector(url, cache=tmp_path / "c", progress=False, attempts=2, backoff_s=0.01)
    message = str(info.value)
    assert url in message and "--detector=PATH" in message and det.ENV_VAR in message
    assert cached_files(tmp_path / "c") == [] and _Handler.hits["/short/inception.pt"] == 2


def test_wrong_checksum_is_refused_at_once(server, tmp_path):
    with pytest.raises(util.DownloadError, match="SHA-256"):
        det.load_detector(f"{server}/plain/inception.pt", cache=tmp_path / "c", progress=False, sha256="0" * 64)
    assert cached_files(tmp_path / "c") == [] and _Handler.hits["/plain/inception.pt"] == 1


def test_right_checksum_is_accepted(server, tmp_path, blob):
    sha = hashlib.sha256(blob).hexdigest()
    d = det.load_detector(f"{server}/plain/inception.pt", cache=tmp_path / "c", progress=False, sha256=sha)
    assert d.feature_dim == 2048


def test_http_500_then_success(server, tmp_path):
    d = det.load_detector(f"{server}/flaky/inception.pt", cache=tmp_path / "c", progress=False, backoff_s=0.01)
    assert _Handler.hits["/flaky/inception.pt"] == 2 and d.feature_dim == 2048


def test_missing_file_names_the_address_at_once(server, tmp_path):
    """A 404 is the address's fault: one request, no retries, and the message names the address and the status."""
    _Handler.hits.pop("/plain/nope.pt", None)
    with pytest.raises(util.DownloadError, match="nope.pt.*404"):
        det.load_detector(f"{server}/plain/nope.pt", cache=tmp_path / "c", progress=False, attempts=5, backoff_s=5)
    assert _Handler.hits["/plain/nope.pt"] == 1


# ----------------------------------------------------------------------------------------------
# Where the detector comes from: --detector > $PFGMPP_DETECTOR > the default URL.


def test_offline_path_and_environment_variable(tmp_path, monkeypatch, blob, server):
    monkeypatch.setattr(det, "DEFAULT_URL", f"{server}/plain/inception.pt")
    path = tmp_path / "inception.pt"
    path.write_bytes(blob)
    assert det.load_detector(str(path)).feature_dim == 2048  # --detector=PATH
    monkeypatch.setenv(det.ENV_VAR, str(path))
    assert det.resolve_source(None) == str(path)
    assert det.load_detector().feature_dim == 2048  # $PFGMPP_DETECTOR
    assert _Handler.hits == {}  # neither touched the network


def test_explicit_source_beats_the_environment(tmp_path, monkeypatch, blob):
    path = tmp_path / "inception.pt"
    path.write_bytes(blob)
    monkeypatch.setenv(det.ENV_VAR, str(tmp_path / "missing.pt"))
    assert det.load_detector(path).feature_dim == 2048
    with pytest.raises(ValueError, match=rf"missing\.pt.*\${det.ENV_VAR}"):
        det.load_detector()


def test_default_url_without_source_or_environment(server, monkeypatch):
    monkeypatch.setattr(det, "DEFAULT_URL", f"{server}/plain/inception.pt")
    assert det.resolve_source(None) == det.DEFAULT_URL
    assert det.load_detector(progress=False).feature_dim == 2048
    assert _Handler.hits == {"/plain/inception.pt": 1}


def test_default_url_is_edms():
    assert det.DEFAULT_URL.endswith("/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl")


def test_missing_local_file_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"no detector file.*--detector"):
        det.load_detector(tmp_path / "nope.pkl")


def test_local_checksum_is_checked_before_reading(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Call(os.system, f"touch {marker}")))
    with pytest.raises(ValueError, match="SHA-256"):
        det.load_detector(path, sha256="0" * 64)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# The pickled form, read with the allow-list; foreign globals are refused before anything runs.


class _JitFromBytes:
    """Pickles as a call rebuilding a TorchScript module from in-memory bytes."""

    def __init__(self, blob: bytes):
        self.blob = blob

    def __reduce__(self):
        return torch.jit.load, (io.BytesIO(self.blob),)


class _Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickled_torchscript_loads_like_the_archive(tmp_path, blob, protocol):
    pkl = tmp_path / "inception.pkl"
    pkl.write_bytes(pickle.dumps(_JitFromBytes(blob), protocol=protocol))
    pt = tmp_path / "inception.pt"
    pt.write_bytes(blob)
    x = images(5)
    assert torch.equal(det.load_detector(pkl).features(x), det.load_detector(pt).features(x))


def test_persistent_record_carrying_torchscript_loads_without_running_its_source(tmp_path, blob):
    marker = tmp_path / "marker"
    record = fx.Persistent("InceptionV3", {"_script": blob, "training": False}, fx.marker_source(marker))
    path = fx.write_pickle(tmp_path / "inception.pkl", record)
    assert det.load_detector(path).feature_dim == 2048
    assert not marker.exists()


def test_default_pickle_holding_only_source_falls_back_to_the_torchscript_archive(server, monkeypatch, tmp_path):
    """If the published .pkl can only be rebuilt by running its source, the default loads the .pt instead."""
    marker = tmp_path / "marker"
    record = fx.Persistent("InceptionV3", {"_parameters": {}, "_modules": {}}, fx.marker_source(marker))
    _Handler.files["inception.pkl"] = fx.write_pickle(tmp_path / "inception.pkl", record).read_bytes()
    monkeypatch.setattr(det, "DEFAULT_URL", f"{server}/plain/inception.pkl")
    monkeypatch.setattr(det, "TORCHSCRIPT_URL", f"{server}/plain/inception.pt")
    with pytest.warns(UserWarning, match="never run here"):
        assert det.load_detector(progress=False).feature_dim == 2048
    assert _Handler.hits == {"/plain/inception.pkl": 1, "/plain/inception.pt": 1}
    assert not marker.exists()
    with pytest.raises(ValueError, match="never executes"):  # an explicit source is not replaced
        det.load_detector(f"{server}/plain/inception.pkl", progress=False)


def test_persistent_record_with_python_only_network_is_refused_with_advice(tmp_path):
    marker = tmp_path / "marker"
    state = {"_parameters": {"w": torch.ones(3)}, "_modules": {}}
    path = fx.write_pickle(tmp_path / "inception.pkl", fx.Persistent("InceptionV3", state, fx.marker_source(marker)))
    with pytest.raises(ValueError, match=r"'InceptionV3'.*never executes.*--detector=https://.*\.pt"):
        det.load_detector(path)
    assert not marker.exists()


@pytest.mark.parametrize("fn, code", [
    (os.system, "touch {marker}"),
    (eval, "open({marker!r}, 'w').close()"),
    (exec, "open({marker!r}, 'w').close()"),
])
def test_foreign_globals_are_refused_before_anything_runs(tmp_path, fn, code):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Call(fn, code.format(marker=str(marker)))))
    with pytest.raises(legacy.UnsafeCheckpointError, match=rf"evil\.pkl.*{fn.__name__}.*allow-list"):
        det.load_detector(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # what a plain pickle.load (EDM's loader) would have done
    assert marker.exists()


def test_torchscript_rebuild_from_a_file_name_is_refused(tmp_path, blob):
    other = tmp_path / "other.pt"
    other.write_bytes(blob)
    path = tmp_path / "indirect.pkl"
    path.write_bytes(pickle.dumps(_Call(torch.jit.load, str(other))))
    with pytest.raises(legacy.UnsafeCheckpointError, match="in-memory bytes"):
        det.load_detector(path)


# ----------------------------------------------------------------------------------------------
# Files that are not detectors.


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, match", [
    (lambda p: _write(p, b"not a model at all"), "neither a TorchScript archive nor a pickle"),
    (lambda p: (torch.save({"w": torch.ones(2)}, p), p)[1], "without TorchScript code"),
    (lambda p: _write(p, pickle.dumps({"w": 1})), "holds a dict"),
    (lambda p: _write(p, pickle.dumps(_JitFromBytes(b"PK\x03\x04garbage"))), "not a TorchScript module"),
    (lambda p: _write(p, script_bytes(NoFeatures())), "no return_features"),
    (lambda p: _write(p, script_bytes(FlatFeatures())), r"\[batch, dim\]"),
    (lambda p: _write(p, pickle.dumps(_JitFromBytes(b"x"))[:-5]), "unreadable pickle"),
])
def test_not_a_detector(tmp_path, make, match):
    path = make(tmp_path / "thing")
    with pytest.raises(ValueError, match=match):
        det.load_detector(path)


# ----------------------------------------------------------------------------------------------
# What the detector computes.


@pytest.fixture()
def detector(tmp_path, blob):
    path = tmp_path / "inception.pt"
    path.write_bytes(blob)
    return det.load_detector(path)


def test_features_match_the_definition(detector):
    x = images(7)
    got = detector.features(x)
    assert got.shape == (7, 2048) and got.dtype == torch.float32 and detector.feature_dim == 2048
    torch.testing.assert_close(got, oracle_features(x), rtol=1e-5, atol=1e-5)


def test_probabilities_are_the_softmax_without_output_bias(detector):
    """StyleGAN3's Inception Score calls the detector with no_output_bias=True."""
    x = images(4)
    probs = detector.probabilities(x)
    assert detector.num_classes == 1008 and probs.shape == (4, 1008)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4))
    torch.testing.assert_close(probs, torch.softmax(oracle_features(x)[:, :1008], dim=1), rtol=1e-5, atol=1e-7)
    assert detector.logits_or_probs(x).shape == (4, 1008)


def test_batches_are_independent_and_chunking_changes_nothing(detector):
    x = images(10, seed=3)
    whole = detector.features(x)
    torch.testing.assert_close(detector.features(x, batch_size=3), whole)  # BLAS may block sizes differently
    torch.testing.assert_close(torch.cat([detector.features(x[:4]), detector.features(x[4:])]), whole)


def test_an_empty_batch_gives_empty_rows(detector):
    empty = torch.zeros([0, 3, 16, 16], dtype=torch.uint8)
    assert detector.features(empty).shape == (0, 2048) and detector.probabilities(empty).shape == (0, 1008)


def test_grayscale_is_repeated_to_rgb(detector):
    gray = images(2)[:, :1]
    torch.testing.assert_close(detector.features(gray), detector.features(gray.repeat(1, 3, 1, 1)))


def test_eval_mode_and_no_grad(detector):
    assert not detector.module.training
    assert all(not p.requires_grad for p in detector.module.parameters())
    with torch.enable_grad():
        assert not detector.features(images(2)).requires_grad


@pytest.mark.parametrize("bad, match", [
    (torch.zeros([2, 3, 16, 16]), "uint8"),
    (torch.zeros([3, 16, 16], dtype=torch.uint8), r"\[N, C, H, W\]"),
    (torch.zeros([2, 4, 16, 16], dtype=torch.uint8), "channels"),
])
def test_bad_images_are_refused_with_advice(detector, bad, match):
    with pytest.raises(ValueError, match=match):
        detector.features(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tmp_path, blob):
    path = tmp_path / "inception.pt"
    path.write_bytes(blob)
    cpu, cuda = det.load_detector(path), det.load_detector(path, device="cuda")
    x = images(16)
    got = cuda.features(x)  # CPU input is moved to the detector's device
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), cpu.features(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cuda.probabilities(x.cuda()).cpu(), cpu.probabilities(x), rtol=1e-4, atol=1e-6)
