"""The model runtime: a loaded model and its batching (``embed``, ``embed_windows``), cached per process.

:func:`load_model` builds a registry entry (:mod:`dask_fp.models`) once per
process and options, so a Dask worker reuses it across tasks: a torch
:class:`LoadedModel`, or a numpy model without weights such as
:class:`dask_fp.layout.LayoutModel`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from .errors import WeightsError
from .models import (
    ModelOptions,
    ModelSpec,
    ResolvedWeights,
    _build_random,
    _sha256,
    get_spec,
    precision_label,
    resolve_weights,
)


def pick_device(device: str) -> str:
    """``"auto"`` becomes ``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise WeightsError("--device cuda was asked for, but torch sees no CUDA device here.")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise WeightsError(f"unknown device {device!r}; use auto, cpu or cuda.")
    return device


class LoadedModel:
    """A model in eval mode on its device, with its normalisation, ready for :meth:`embed`."""

    def __init__(self, spec: ModelSpec, weights: ResolvedWeights, options: ModelOptions) -> None:
        import torch

        self.spec, self.options = spec, options
        self.device = pick_device(options.device)
        if weights.kind == "random":
            net = _build_random(spec, options.seed)
        else:
            if weights.path is None:
                raise WeightsError(f"{spec.name}: resolved weights of kind {weights.kind!r} carry no file path")
            # Checked again where the model loads (a worker): the file may have changed since.
            found = _sha256(Path(weights.path))
            if found != weights.sha256:
                raise WeightsError(
                    f"weights file {weights.path} changed since it was checked (sha256 {found}, expected"
                    f" {weights.sha256}); refusing to load it."
                )
            net = spec.builder()
            state = torch.load(weights.path, map_location="cpu", weights_only=True)
            if spec.name == "resnet18":
                state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            target = net.net if hasattr(net, "net") else net
            missing, unexpected = target.load_state_dict(state, strict=False)
            bad = [k for k in missing if not k.startswith(("fc.", "_fc."))]
            if bad or [k for k in unexpected if not k.startswith(("fc.", "_fc."))]:
                raise WeightsError(
                    f"weights file {weights.path} does not fit {spec.name}: missing {bad[:3]},"
                    f" unexpected {list(unexpected)[:3]}"
                )
        net.eval()
        self.cuda = self.device.startswith("cuda")
        self.precision = precision_label(options.precision, cuda=self.cuda)
        if self.cuda:
            net = net.to(self.device, memory_format=torch.channels_last)
        self.net = net
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """Fingerprints of uint8 windows.

        Parameters
        ----------
        pixels : ndarray of uint8, shape (n, 3, H, W)

        Returns
        -------
        ndarray of float32, shape (n, dim)
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected (n, 3, H, W) uint8 windows, got shape {pixels.shape}")
        bs = self.batch_size
        return self._run(pixels.shape[0], lambda i: pixels[i : i + bs])

    @property
    def batch_size(self) -> int:
        """Windows per forward pass (``options.batch_size``, or 256 on a GPU and 32 on the CPU)."""
        return self.options.batch_size or (256 if self.cuda else 32)

    def embed_windows(self, rgb: np.ndarray, iy: np.ndarray, ix: np.ndarray, *, tile: int,
                      stride: int) -> np.ndarray:
        """Fingerprints of the windows ``(iy[k], ix[k])`` of a block ``rgb`` ``(3, h, w)`` uint8.

        Window ``(i, j)`` covers ``rgb[:, i*S : i*S+T, j*S : j*S+T]``. On the
        CPU, windows are copied one batch at a time into one reused buffer; on
        a GPU the block goes to the device once (overlapping windows share its
        pixels: about 4x fewer bytes than the windows at S = T/2) and each
        batch is gathered there (:func:`device_windows`).
        """
        from .layout import gather_windows

        bs = self.batch_size
        if len(iy) == 0:
            return np.empty((0, self.spec.dim), dtype=np.float32)
        if self.cuda:
            return self._run(len(iy), device_windows(rgb, iy, ix, tile=tile, stride=stride, batch_size=bs,
                                                     device=self.device))
        buf = np.empty((min(bs, len(iy)), rgb.shape[0], tile, tile), dtype=rgb.dtype)
        return self._run(len(iy), lambda i: gather_windows(rgb, iy[i : i + bs], ix[i : i + bs], tile=tile,
                                                           stride=stride, out=buf))

    def _run(self, n: int, batch: Callable[[int], Any]) -> np.ndarray:
        """The forward pass over ``n`` windows, ``batch(i)`` giving the uint8 windows from ``i`` on
        (a numpy array, or a torch tensor already on the device)."""
        import torch

        out = np.empty((n, self.spec.dim), dtype=np.float32)
        bs = self.batch_size
        with _torch_threads(self.options.threads), torch.inference_mode():
            for i in range(0, n, bs):
                x = batch(i)
                if isinstance(x, np.ndarray):
                    x = torch.from_numpy(np.ascontiguousarray(x))
                if self.cuda:
                    if x.device.type == "cpu":
                        x = x.pin_memory().to(self.device, non_blocking=True)
                    x = x.contiguous(memory_format=torch.channels_last)
                x = (x.float() - self.mean) / self.std
                size = self.options.input_size
                if size and tuple(x.shape[-2:]) != (size, size):
                    x = torch.nn.functional.interpolate(
                        x, size=(size, size), mode="bilinear", align_corners=False,
                        antialias=size < x.shape[-1],
                    )
                if self.precision == "bfloat16-autocast":
                    with torch.autocast("cuda" if self.cuda else "cpu", dtype=torch.bfloat16):
                        y = self.net(x)
                else:
                    y = self.net(x)
                out[i : i + bs] = y.float().cpu().numpy()
        return out


def device_windows(rgb: np.ndarray, iy: np.ndarray, ix: np.ndarray, *, tile: int, stride: int, batch_size: int,
                   device: str) -> Callable[[int], Any]:
    """Move a block ``(bands, h, w)`` uint8 to ``device`` once; return ``batch(i)``, the windows
    ``(iy, ix)[i : i + batch_size]`` as a ``(n, bands, T, T)`` uint8 tensor gathered on the device."""
    import torch

    blk = torch.from_numpy(np.ascontiguousarray(rgb))
    if device != "cpu":
        blk = blk.pin_memory().to(device, non_blocking=True)
    grid = blk.unfold(1, tile, stride).unfold(2, tile, stride)  # (bands, n_wy, n_wx, T, T), a view
    ty = torch.as_tensor(np.asarray(iy, dtype=np.int64), device=blk.device)
    tx = torch.as_tensor(np.asarray(ix, dtype=np.int64), device=blk.device)

    def batch(i: int) -> Any:
        return grid[:, ty[i : i + batch_size], tx[i : i + batch_size]].permute(1, 0, 2, 3)

    return batch


class _torch_threads:
    """Set torch's intra-op thread count for a block of work (0: unchanged)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        import torch

        self.old = torch.get_num_threads()
        if self.n > 0:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.n > 0:
            torch.set_num_threads(self.old)


class Embedder(Protocol):
    """What :func:`load_model` returns: a torch :class:`LoadedModel`, or a numpy model such as
    :class:`dask_fp.layout.LayoutModel`."""

    precision: str

    def embed(self, pixels: np.ndarray) -> np.ndarray: ...

    def embed_windows(self, rgb: np.ndarray, iy: np.ndarray, ix: np.ndarray, *, tile: int,
                      stride: int) -> np.ndarray: ...


@functools.lru_cache(maxsize=4)
def load_model(options: ModelOptions, weights: ResolvedWeights) -> Embedder:
    """The model for ``options`` in this process, built once and reused."""
    spec = get_spec(options.name)
    if spec.weights is None:  # a fixed numpy function: no weights, no torch
        return cast(Embedder, spec.builder())
    return LoadedModel(spec, weights, options)


def embed(
    pixels: np.ndarray, options: ModelOptions = ModelOptions(), weights: ResolvedWeights | None = None
) -> np.ndarray:
    """Fingerprints of uint8 windows ``(n, 3, H, W)`` with the model of ``options``."""
    weights = weights or resolve_weights(options)
    return load_model(options, weights).embed(pixels)
