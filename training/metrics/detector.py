"""The feature detector of FID, KID and Inception Score: Inception-v3 as EDM and StyleGAN3 use it.

What the published detector is (facts from EDM's fid.py, EDM2's calculate_metrics.py, StyleGAN3's
metrics/*.py and StyleGAN2-ADA's metrics/metric_utils.py, and the TorchScript code of the archive):
- EDM, EDM2 and StyleGAN3 download `DEFAULT_URL` and load it with a plain `pickle.load`, so a
  plain load runs whatever the pickle asks for. StyleGAN2-ADA published its port of the same
  TensorFlow graph as a TorchScript archive (`TORCHSCRIPT_URL`), loaded with `torch.jit.load`.
- The module is called on uint8 NCHW images of any size with 3 channels; it resizes to 299x299
  itself (bilinear `grid_sample`, border padding), maps pixels by (x - 128) / 128, and returns
  `forward(img, return_features=False, use_fp16=False, no_output_bias=False)`:
  with `return_features=True` the 2048 pool features [B, 2048] in float32 (FID, KID); otherwise the
  softmax over the 1008 outputs of its final linear layer (the TF graph's 1008 classes), without that
  layer's bias when `no_output_bias=True`, which is how StyleGAN3 computes the Inception Score.
- No SHA-256 or byte size of either file is published that we could find, so none is pinned here
  (none is invented): a download is checked against its Content-Length only, unless the caller
  passes `sha256`, which is then checked before anything is unpickled.

How it is loaded here, without running code from the file:
- A TorchScript archive (zip with TorchScript code) goes to `torch.jit.load`, which compiles only
  TorchScript, never Python.
- A pickle goes through `training.checkpoint.legacy.SafeUnpickler` with the detector allow-list below: inert
  data types, EDM's persistent-class record (its `module_src` is kept as text, never executed), and
  one rebuild call, `torch.jit.load` on in-memory bytes. A plain pickle cannot hold a TorchScript
  module itself (pickling one fails, checked with torch 2.13), so a pickled detector is such a
  rebuild call, or a persistent record whose state carries the TorchScript bytes. Any other global
  is refused with its name before anything runs; a record whose network exists only as Python
  source is refused with advice. Which form the published .pkl takes inside could not be confirmed
  from public material (no listing of its globals is published): if it is neither, the error names
  what was refused and points to `TORCHSCRIPT_URL`, which needs no pickle at all.
"""

from __future__ import annotations

import io
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from dnnlib import util
from torch_utils import distributed
from training.checkpoint import legacy

DEFAULT_URL = "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl"
TORCHSCRIPT_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
ENV_VAR = "PFGMPP_DETECTOR"
_ZIP_MAGIC = b"PK\x03\x04"
_HINT = f"pass --detector=PATH (or set ${ENV_VAR}=PATH) to a local copy of the detector"


def _script_from_bytes(buffer: Any, map_location: Any = None, _extra_files: Any = None, *_: Any):
    """The rebuild call a detector pickle may make: torch.jit.load on in-memory bytes only."""
    if isinstance(buffer, (bytes, bytearray)):
        buffer = io.BytesIO(buffer)
    if not isinstance(buffer, io.BytesIO) or _extra_files:
        raise legacy.UnsafeCheckpointError("torch.jit.load is admitted on in-memory bytes only, not on a file name")
    return _load_script(buffer)


def _load_script(f) -> torch.jit.ScriptModule:
    """torch.jit.load onto the CPU, its failures turned into a ValueError."""
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in torch >= 2.10, but it is the detector's format
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(f, map_location="cpu")
    except RuntimeError as error:
        raise ValueError(f"not a TorchScript module ({str(error).splitlines()[0]})") from None


class DetectorUnpickler(legacy.SafeUnpickler):
    """The checkpoint allow-list (inert data and EDM records) plus TorchScript rebuilt from bytes."""

    allowed = {
        **legacy.SafeUnpickler.allowed,
        ("torch.jit._serialization", "load"): _script_from_bytes,
        ("torch.jit", "load"): _script_from_bytes,
        ("_io", "BytesIO"): io.BytesIO,
        ("io", "BytesIO"): io.BytesIO,
    }


class SourceOnlyDetector(ValueError):
    """The file's network exists only as Python source, which is never executed here."""


def resolve_source(source: str | os.PathLike | None = None) -> str:
    """Where the detector comes from: `source` if given, else $PFGMPP_DETECTOR, else DEFAULT_URL."""
    if source is not None and str(source) != "":
        return str(source)
    return os.environ.get(ENV_VAR) or DEFAULT_URL


def load_detector(
    source: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    cache: str | os.PathLike | None = None,
    progress: bool = True,
    sha256: str | None = None,
    **download_kwargs,
) -> Detector:
    """The detector from a path or URL (see `resolve_source`), on `device`, in eval mode.

    A URL is downloaded once into `cache` (default: dnnlib's cache folder) with retries and a
    progress bar; `sha256`, when given, is checked before the file is read. `download_kwargs`
    (attempts, backoff_s, timeout_s) go to `dnnlib.util.download`.
    """
    where = resolve_source(source)
    if util.is_url(where):
        try:
            path = util.download(where, sha256=sha256, cache=cache, progress=progress, **download_kwargs)
        except util.DownloadError as error:
            raise util.DownloadError(f"the feature detector could not be fetched: {error}. Without network access, "
                                     f"{_HINT}") from None
    else:
        path = Path(where).expanduser()
        if not path.is_file():
            origin = f"${ENV_VAR}" if source is None or str(source) == "" else "--detector"
            raise ValueError(f"no detector file at {path} (from {origin}); {_HINT}, or leave both unset to download it")
        digest = util.sha256_of(path) if sha256 is not None else None
        if digest is not None and digest != sha256.lower():
            raise ValueError(f"{path}: SHA-256 {digest} is not the expected {sha256.lower()}; the file was not read")
    try:
        module = read_module(path)
    except SourceOnlyDetector:
        if where != DEFAULT_URL or (source is not None and str(source) != ""):
            raise
        # The published pickle could not be read without running its source: use the TorchScript
        # archive of the same Inception port (StyleGAN2-ADA's), which loads without Python.
        warnings.warn(f"{DEFAULT_URL} holds Python source, which is never run here; using {TORCHSCRIPT_URL}")
        return load_detector(TORCHSCRIPT_URL, device, cache, progress, None, **download_kwargs)
    return Detector(module, device=device, source=where)


def load_shared(source: str | os.PathLike | None, device: torch.device | str) -> Detector:
    """`load_detector` on every rank, rank 0 first: a download into the shared cache happens once."""
    return distributed.main_first(lambda: load_detector(source, device=device, progress=distributed.is_main()))


def read_module(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """The TorchScript module in a detector file (TorchScript archive or pickle); runs no Python from it."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head == _ZIP_MAGIC:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if not any("/code/" in n or n.endswith("constants.pkl") for n in names):
            raise ValueError(f"not a detector: {path} is a zip (torch.save checkpoint?) without TorchScript code; "
                             "a detector is a TorchScript module (torch.jit.save) or Inception pickle as EDM uses")
        try:
            return _load_script(str(path))
        except ValueError as error:
            raise ValueError(f"not a detector: {path}: {error}") from None
    if not head.startswith(b"\x80"):
        raise ValueError(f"not a detector: {path} is neither a TorchScript archive nor a pickle; {_HINT}")
    try:
        with open(path, "rb") as f:
            obj = DetectorUnpickler(f).load()
    except legacy.UnsafeCheckpointError as error:
        raise legacy.UnsafeCheckpointError(f"{path} was not loaded as a detector: {error}. A TorchScript detector "
                                           f"needs no pickle: --detector={TORCHSCRIPT_URL}") from None
    except ValueError as error:
        raise ValueError(f"not a detector: {path}: {error}") from None
    except Exception as error:  # a malformed pickle fails in many ways; none of them ran code from it
        raise ValueError(f"not a detector: {path}: unreadable pickle ({type(error).__name__}: {error})") from None
    return _module_in(obj, path)


def _module_in(obj: Any, path: Path) -> torch.jit.ScriptModule:
    """The TorchScript module an unpickled detector holds, directly or inside an EDM persistent record."""
    if isinstance(obj, torch.jit.ScriptModule):
        return obj
    if isinstance(obj, legacy.PersistentRecord):
        found = list(_scripts_in(obj.state))
        if len(found) == 1:
            return found[0]
        if not found:
            raise SourceOnlyDetector(
                f"{path} holds the persistent class {obj.class_name!r}, whose network exists only as Python source "
                f"inside the pickle; this program never executes such code. Use the TorchScript form of the same "
                f"detector instead: --detector={TORCHSCRIPT_URL} (or a local copy)"
            )
        raise ValueError(f"not a detector: {path} holds {len(found)} TorchScript modules; expected one")
    raise ValueError(f"not a detector: {path} holds a {type(obj).__name__}, not a TorchScript module")


def _scripts_in(value: Any, depth: int = 0):
    """TorchScript modules (or archives as bytes) anywhere in plain containers of a record's state."""
    if depth > 8:
        return
    if isinstance(value, torch.jit.ScriptModule):
        yield value
    elif isinstance(value, (bytes, bytearray)) and bytes(value[:4]) == _ZIP_MAGIC:
        yield _script_from_bytes(value)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _scripts_in(item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _scripts_in(item, depth + 1)
    elif isinstance(value, (legacy.PersistentRecord, legacy.ModuleRecord)):
        yield from _scripts_in(value.state, depth + 1)


class Detector:
    """uint8 NCHW images -> features [B, feature_dim] float32, or class probabilities [B, num_classes].

    The module runs in eval mode without gradients on `device`; a batch is one call (or a few calls
    of `batch_size` images), never a loop over images.
    """

    def __init__(self, module: torch.jit.ScriptModule, device: torch.device | str = "cpu", source: str = "?"):
        self.source = source
        self.device = torch.device(device)
        names = _argument_names(module)
        if "return_features" not in names:
            raise ValueError(f"not a detector: {source}: its forward takes no return_features argument "
                             f"(it takes {', '.join(names) or 'nothing known'})")
        self._no_output_bias = "no_output_bias" in names
        self.module = module.eval().to(self.device)
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self._num_classes: int | None = None
        try:
            probe = self._call(self._probe_images(), True)
        except Exception as error:  # the module's own failure, reported with what was attempted
            raise ValueError(f"not a detector: {source}: calling it on a uint8 image batch failed ({error})") from None
        if probe.ndim != 2 or probe.shape[0] != 1 or not probe.is_floating_point():
            raise ValueError(f"not a detector: {source}: features should be [batch, dim] floats, got "
                             f"{tuple(probe.shape)} {probe.dtype}")
        self.feature_dim = int(probe.shape[1])

    @property
    def num_classes(self) -> int:
        """Number of class probabilities `probabilities` returns (1008 for the Inception port)."""
        if self._num_classes is None:
            self._num_classes = int(self._call(self._probe_images(), False).shape[1])
        return self._num_classes

    def _probe_images(self) -> torch.Tensor:
        return torch.zeros([1, 3, 16, 16], dtype=torch.uint8, device=self.device)

    def features(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Pool features [B, feature_dim] float32 on `device` of uint8 NCHW images (FID, KID)."""
        return self._run(images, True, batch_size)

    def probabilities(self, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Softmax class probabilities [B, num_classes] of uint8 NCHW images (Inception Score).

        The final layer's bias is left out when the module supports it (`no_output_bias=True`), as
        StyleGAN3's Inception Score does to match the original TensorFlow implementation.
        """
        return self._run(images, False, batch_size)

    logits_or_probs = probabilities

    def _run(self, images: torch.Tensor, return_features: bool, batch_size: int | None) -> torch.Tensor:
        images = _check_images(images).to(self.device, non_blocking=True)
        if len(images) == 0:
            return torch.zeros([0, self.feature_dim if return_features else self.num_classes], device=self.device)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        step = batch_size or len(images)
        parts = [self._call(images[i : i + step], return_features) for i in range(0, len(images), step)]
        return torch.cat(parts) if len(parts) != 1 else parts[0]

    def _call(self, images: torch.Tensor, return_features: bool) -> torch.Tensor:
        kwargs = {"return_features": return_features}
        if not return_features and self._no_output_bias:
            kwargs["no_output_bias"] = True
        with torch.no_grad():
            return self.module(images, **kwargs).to(torch.float32)


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"the detector takes a batch of images [N, C, H, W], got {shape}")
    if images.dtype != torch.uint8:
        raise ValueError(f"the detector takes uint8 images in 0..255, got {images.dtype}; convert with "
                         "(x * 127.5 + 128).clamp(0, 255).to(torch.uint8) from [-1, 1]")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"the detector takes 1 or 3 channels, got {images.shape[1]}")
    return images


def _argument_names(module: torch.jit.ScriptModule) -> list[str]:
    """Names of the forward arguments after self, from the TorchScript schema."""
    try:
        return [a.name for a in module.forward.schema.arguments][1:]
    except AttributeError:
        return []
