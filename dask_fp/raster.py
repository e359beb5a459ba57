"""Read an orthomosaic's pixels: a lazy, chunked DataArray, the per-block RGB kernel, window read-back.

:func:`open_raster` turns a :class:`~dask_fp.inspection.RasterSpec` (made on
the client by :func:`~dask_fp.inspection.inspect_raster`) into a
``DataArray(band, y, x)`` backed by dask, cropped to whole tiles and chunked
in multiples of the stride. :func:`to_rgb_and_empty` is the per-block kernel
that turns raw band values into uint8 RGB plus the empty-pixel mask; it is
pure numpy. :func:`read_window` reads one stored window back from its source.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .errors import RasterError
from .inputs import gdal_path, gdal_reason, remote_error

# The source inspection lives in dask_fp.inspection; re-exported so
# ``from dask_fp.raster import RasterOptions, inspect_raster`` keeps working.
from .inspection import (
    PERCENTILE_STRETCH,
    RasterOptions,
    RasterSpec,
    ScaleChoice,
    inspect_raster,
    inspect_rasters,
)
from .tiling import Tiling, chunk_sizes, crop_size

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "GDAL_CACHE_MB", "PERCENTILE_STRETCH", "RasterOptions", "RasterSpec", "ScaleChoice", "inspect_raster",
    "inspect_rasters", "limit_gdal_cache", "open_raster", "read_window", "to_rgb_and_empty",
]


#: GDAL's block cache per worker process, in MiB. GDAL's default (5 % of RAM) keeps
#: decoded blocks of a large orthomosaic around although each is read about once; capped,
#: worker memory stays flat as images grow (bench/ingest.py section 4).
GDAL_CACHE_MB = 256


@functools.cache
def limit_gdal_cache(mb: int = GDAL_CACHE_MB) -> None:
    """Cap GDAL's block cache in this process (once)."""
    from rasterio.env import set_gdal_config

    set_gdal_config("GDAL_CACHEMAX", int(mb))


def open_raster(spec: RasterSpec, tiling: Tiling, *, chunk: int = 2048) -> xr.DataArray:
    """Open ``spec`` lazily as ``DataArray(band, y, x)``, cropped to whole tiles.

    The colour bands come first (in R, G, B order), then the alpha band if
    any. Chunks are multiples of the stride (see
    :func:`dask_fp.tiling.chunk_sizes`), aligned with the file's internal
    blocks when those are multiples of the stride too. Nothing is read until
    the array is computed.
    """
    import rioxarray
    import xarray as xr

    h = crop_size(spec.height, tile=tiling.tile)
    w = crop_size(spec.width, tile=tiling.tile)
    cy = _aligned_chunk(chunk, spec.block_shape[0], tiling.stride)
    cx = _aligned_chunk(chunk, spec.block_shape[1], tiling.stride)
    ys = chunk_sizes(h, chunk=cy, tile=tiling.tile, stride=tiling.stride)
    xs = chunk_sizes(w, chunk=cx, tile=tiling.tile, stride=tiling.stride)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        da = rioxarray.open_rasterio(
            spec.path,
            chunks={"band": -1, "y": _pad_last(ys, spec.height), "x": _pad_last(xs, spec.width)},
            masked=False,
            cache=False,
            lock=False,
        )
    read = list(spec.bands) + ([spec.alpha] if spec.alpha is not None else [])
    if not isinstance(da, xr.DataArray):
        raise RasterError(f"{spec.path}: holds several subdatasets; pass one of them (e.g. with a GDAL path).")
    da = da.isel(band=[b - 1 for b in read], y=slice(0, h), x=slice(0, w))
    return da.chunk({"band": -1, "y": ys if h else -1, "x": xs if w else -1})


def _aligned_chunk(chunk: int, block: int, stride: int) -> int:
    """A chunk size near ``chunk`` that is a multiple of the stride, and of the
    file's internal block size when that is compatible."""
    base = max(stride, chunk // stride * stride)
    if block > 0 and block % stride == 0 and block <= 4 * base:
        return max(block, base // block * block)
    return base


def _pad_last(sizes: Sequence[int], full: int) -> tuple[int, ...]:
    """Chunks for the uncropped axis: the cropped chunks, the last one extended."""
    out = list(sizes) if sum(sizes) else [full]
    out[-1] += full - sum(out)
    return tuple(out)


def to_rgb_and_empty(
    block: np.ndarray,
    *,
    n_colour: int,
    has_alpha: bool,
    nodata: float | None,
    scale: tuple[tuple[float, float], ...] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw block values to uint8 RGB and the empty-pixel mask.

    A pixel is empty when it is black (0) in all colour bands, equal to the
    nodata value in any colour band, not finite, or when alpha is 0.

    Parameters
    ----------
    block : ndarray, shape (bands, h, w)
        Colour bands first, then the alpha band if ``has_alpha``.

    Returns
    -------
    rgb : ndarray of uint8, shape (3, h, w)
    empty : ndarray of bool, shape (h, w)
    """
    colour = block[:n_colour]
    if colour.dtype.kind in "biu":  # black in all bands: no bit set in any band (cheaper than np.all)
        empty = np.bitwise_or.reduce(colour, axis=0) == 0
    else:
        empty = np.all(colour == 0, axis=0)
    if nodata is not None:
        empty |= np.any(colour == nodata, axis=0)
    if colour.dtype.kind == "f":
        empty |= ~np.all(np.isfinite(colour), axis=0)
    if has_alpha:
        empty |= block[n_colour] == 0
    if scale is None:
        rgb = colour.astype(np.uint8, copy=False)
    else:
        lo = np.array([s[0] for s in scale], dtype=np.float32)[:, None, None]
        hi = np.array([s[1] for s in scale], dtype=np.float32)[:, None, None]
        with np.errstate(invalid="ignore"):
            x = (colour.astype(np.float32) - lo) * (255.0 / (hi - lo))
        rgb = np.nan_to_num(np.clip(np.rint(x), 0, 255), nan=0.0).astype(np.uint8)
    return rgb, empty


def read_window(source: dict, wy: int, wx: int, *, tile: int, stride: int) -> np.ndarray:
    """Pixels of one stored window, read back from its source file, as ``(T, T, 3)`` uint8.

    ``source`` is an entry of a store's ``sources`` table (path, bands,
    alpha, nodata, scale); the same conversion as at ingest is applied.
    """
    import rasterio
    from rasterio.windows import Window

    bands = list(source["bands"]) + ([source["alpha"]] if source.get("alpha") else [])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rasterio.open(gdal_path(source["path"]) or source["path"]) as ds:
                block = ds.read(bands, window=Window(wx * stride, wy * stride, tile, tile))
    except Exception as e:  # missing, changed or damaged since ingest
        msg = f"cannot read back window ({wy},{wx}): {gdal_reason(e)}"
        if gdal_path(source["path"]) is not None:
            raise RasterError(remote_error(str(source["path"]), msg)) from None
        raise RasterError(f"{source['path']}: {msg}") from None
    scale = source.get("scale")
    rgb, _ = to_rgb_and_empty(
        block,
        n_colour=len(source["bands"]),
        has_alpha=bool(source.get("alpha")),
        nodata=source.get("nodata"),
        scale=None if scale is None else tuple(tuple(s) for s in scale),
    )
    return np.ascontiguousarray(rgb.transpose(1, 2, 0))
