"""Open an orthomosaic as a lazy, chunked DataArray; bands, nodata, alpha, scaling, CRS.

:func:`inspect_raster` checks a file on the client and returns a
:class:`RasterSpec` (a frozen, picklable description: bands to use, alpha,
nodata, the scaling to uint8, CRS and transform, content hash).
:func:`open_raster` turns that spec into a ``DataArray(band, y, x)`` backed by
dask, cropped to whole tiles and chunked in multiples of the stride.
:func:`to_rgb_and_empty` is the per-block kernel that turns raw band values
into uint8 RGB plus the empty-pixel mask; it is pure numpy.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from .errors import RasterError
from .inputs import file_sha256, gdal_path, remote_error
from .tiling import Affine6, Tiling, chunk_sizes, crop_size

if TYPE_CHECKING:
    import xarray as xr

ScaleChoice = Literal["percentile"] | tuple[float, float] | None

#: Percentiles of the per-band stretch used by ``scale="percentile"``.
PERCENTILE_STRETCH = (2.0, 98.0)


@dataclass(frozen=True)
class RasterOptions:
    """How to read a raster.

    Parameters
    ----------
    bands : tuple of int, optional
        1-based band numbers to use as R, G, B. Required when a file has more
        than 3 bands (4 bands with an alpha band excepted).
    replicate : bool
        Allow a 1-band (or gray + alpha) raster by repeating the band as R, G, B.
    scale : "percentile", (min, max) or None
        How non-uint8 values become uint8. ``"percentile"``: a per-band linear
        stretch between the 2nd and 98th percentile of the valid pixels
        (estimated on a decimated read of at most ~1 Mpx). ``(min, max)``: one
        linear stretch for all bands. ``None`` (default): uint8 data is used as
        is, and any other data type is refused until a choice is made.
    chunk : int
        Target chunk side in pixels, rounded to a multiple of the stride.
    """

    bands: tuple[int, ...] | None = None
    replicate: bool = False
    scale: ScaleChoice = None
    chunk: int = 2048


@dataclass(frozen=True)
class RasterSpec:
    """Everything a worker needs to know about one source raster (picklable)."""

    path: str
    sha256: str
    height: int
    width: int
    count: int
    dtype: str
    bands: tuple[int, ...]
    alpha: int | None
    nodata: float | None
    scale: tuple[tuple[float, float], ...] | None
    crs_wkt: str | None
    transform: Affine6
    block_shape: tuple[int, int]

    @property
    def n_read(self) -> int:
        """Bands read per pixel: the colour bands, plus the alpha band if any."""
        return len(self.bands) + (self.alpha is not None)


#: GDAL's block cache per worker process, in MiB. GDAL's default (5 % of RAM) keeps
#: decoded blocks of a large orthomosaic around although each is read about once; capped,
#: worker memory stays flat as images grow (bench/ingest.py section 4).
GDAL_CACHE_MB = 256


@functools.cache
def limit_gdal_cache(mb: int = GDAL_CACHE_MB) -> None:
    """Cap GDAL's block cache in this process (once)."""
    from rasterio.env import set_gdal_config

    set_gdal_config("GDAL_CACHEMAX", int(mb))


def inspect_raster(
    path: str | os.PathLike[str], options: RasterOptions = RasterOptions(), *, content_hash: bool = True
) -> RasterSpec:
    """Check that ``path`` is a usable orthomosaic and describe it.

    With ``content_hash=False`` the file is not hashed (``sha256`` is empty):
    :func:`dask_fp.ingest.ingest` hashes on the workers instead.

    Raises
    ------
    RasterError
        With the file name, what is wrong and what to do.
    """
    import rasterio
    from rasterio.enums import ColorInterp
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
    from rasterio.windows import Window

    remote = gdal_path(path)
    p: Path | str
    if remote is not None:
        p = remote
    else:
        p = Path(path)
        if not p.exists():
            raise RasterError(f"{p}: no such file. Check the path.")
        if p.is_dir():
            raise RasterError(f"{p}: is a directory, not a raster file. Pass the image files inside it.")
        if p.stat().st_size == 0:
            raise RasterError(f"{p}: the file is empty (0 bytes). Re-copy or re-export the raster.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(p) as ds:
                _check_driver(p, ds.driver)
                count, height, width = ds.count, ds.height, ds.width
                dtypes = set(ds.dtypes)
                interp = list(ds.colorinterp)
                nodata = ds.nodata
                crs_wkt = ds.crs.to_wkt() if ds.crs else None
                transform = tuple(ds.transform)[:6]
                block_shape = tuple(ds.block_shapes[0]) if ds.block_shapes else (height, width)
                bands, alpha = _choose_bands(p, count, interp, options, ColorInterp.alpha)
                dtype = ds.dtypes[bands[0] - 1]
                if len(dtypes) > 1:
                    raise RasterError(f"{p}: bands have mixed data types {sorted(dtypes)}; convert to one type first.")
                scale = _choose_scale(p, ds, dtype, bands, alpha, nodata, options.scale)
                # A truncated file keeps its header; its last block is what goes missing.
                ds.read(window=Window(max(width - 1, 0), max(height - 1, 0), 1, 1))
    except RasterError:
        raise
    except MemoryError:
        raise RasterError(f"{p}: the header asks for more memory than there is; is the file damaged?") from None
    except Exception as e:  # GDAL raises RasterioIOError, CPLE_* errors, ValueError, ... for damaged files
        kind = "" if isinstance(e, RasterioIOError) else f"{type(e).__name__}: "
        if isinstance(p, str):
            raise RasterError(remote_error(p, f"{kind}{_first_line(e)}")) from None
        raise RasterError(
            f"{p}: not a readable raster ({kind}{_first_line(e)}). Is it a GeoTIFF/COG, and is it complete?"
        ) from None
    if crop_size(height, tile=1) == 0 or crop_size(width, tile=1) == 0:
        raise RasterError(f"{p}: raster has no pixels ({height}x{width}).")
    return RasterSpec(
        path=p if isinstance(p, str) else str(p.resolve()),
        sha256=file_sha256(p) if content_hash else "",
        height=height,
        width=width,
        count=count,
        dtype=str(dtype),
        bands=bands,
        alpha=alpha,
        nodata=None if nodata is None else float(nodata),
        scale=scale,
        crs_wkt=crs_wkt,
        transform=transform,
        block_shape=(int(block_shape[0]), int(block_shape[1])),
    )


#: Header checks run at once by :func:`inspect_rasters` (threads; GDAL releases the GIL while it
#: reads, and a remote input's check is mostly waiting for the network).
INSPECT_THREADS = 16


def inspect_rasters(
    paths: Sequence[str | os.PathLike[str]], options: RasterOptions = RasterOptions(), *,
    content_hash: bool = True, threads: int = INSPECT_THREADS,
) -> list[RasterSpec]:
    """:func:`inspect_raster` for every path, up to ``threads`` at once, in the order given.

    Each file gets its own dataset handle in its own thread. When several files
    are bad, the error raised is the first bad file's in the order given (the
    one a loop over the paths would have stopped at).

    Raises
    ------
    RasterError
        With the first bad file's name, what is wrong and what to do.
    """
    from concurrent.futures import ThreadPoolExecutor

    from rasterio.errors import NotGeoreferencedWarning

    n = max(1, min(int(threads), len(paths)))
    if n == 1:
        return [inspect_raster(p, options, content_hash=content_hash) for p in paths]
    # The threads' own ``catch_warnings`` blocks save and restore the process-wide filters
    # out of order; this block, on the calling thread, restores them once they are all done.
    with warnings.catch_warnings(), ThreadPoolExecutor(n, thread_name_prefix="dask-fp-inspect") as pool:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        futures = [pool.submit(inspect_raster, p, options, content_hash=content_hash) for p in paths]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()


def _first_line(e: BaseException) -> str:
    """The first line of an error's message, with GDAL's own reason when rasterio hides it."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    cause = e.__cause__ or e.__context__
    if cause is not None and "previous exception" in line and str(cause).strip():
        line = str(cause).strip().splitlines()[0]
    return line


#: File name endings that promise a TIFF, and the GDAL drivers that read TIFFs.
_TIFF_SUFFIXES = {".tif", ".tiff", ".gtif"}
_TIFF_DRIVERS = {"GTiff", "COG", "LIBERTIFF"}


def _check_driver(p: Path | str, driver: str) -> None:
    """A file named ``*.tif`` must be a TIFF: anything else there is a mix-up, not an orthomosaic."""
    suffix = Path(str(p).split("?")[0]).suffix.lower()
    if suffix in _TIFF_SUFFIXES and driver not in _TIFF_DRIVERS:
        raise RasterError(
            f"{p}: named like a GeoTIFF, but its content is a {driver} file. Check that the right"
            " file was exported or copied; to ingest a plain picture, give it its own file ending."
        )


def _choose_bands(
    p: Path | str, count: int, interp: list, options: RasterOptions, alpha_interp: object
) -> tuple[tuple[int, ...], int | None]:
    alpha_bands = [i + 1 for i, c in enumerate(interp) if c == alpha_interp]
    alpha = alpha_bands[0] if alpha_bands else None
    if options.bands is not None:
        bands = tuple(int(b) for b in options.bands)
        bad = [b for b in bands if not 1 <= b <= count]
        if bad:
            raise RasterError(f"{p}: band(s) {bad} do not exist; the file has bands 1..{count}.")
        if len(bands) == 1 and options.replicate:
            bands = bands * 3
        if len(bands) != 3:
            raise RasterError(
                f"{p}: --bands needs exactly 3 band numbers (R,G,B), got {list(bands)}"
                " (or one band with --replicate)."
            )
        return bands, (alpha if alpha not in bands else None)
    colour = [b for b in range(1, count + 1) if b != alpha]
    if len(colour) == 3:
        return tuple(colour), alpha
    if len(colour) == 1:
        if options.replicate:
            return (colour[0],) * 3, alpha
        raise RasterError(
            f"{p}: single-band raster (1 colour band of {count}); the models need RGB."
            " Pass --replicate to repeat the band as R, G and B."
        )
    if len(colour) == 2:
        raise RasterError(
            f"{p}: 2-band raster without an alpha band; the models need RGB."
            " Choose bands with --bands B,B,B (e.g. --bands 1,1,1) or convert the file."
        )
    raise RasterError(
        f"{p}: {count} bands; say which three are red, green and blue with --bands R,G,B"
        " (1-based, e.g. --bands 3,2,1 for Sentinel-2 B04,B03,B02 stacks)."
    )


def _choose_scale(
    p: Path | str,
    ds: object,
    dtype: str,
    bands: tuple[int, ...],
    alpha: int | None,
    nodata: float | None,
    choice: ScaleChoice,
) -> tuple[tuple[float, float], ...] | None:
    if choice is None:
        if np.dtype(dtype) == np.uint8:
            return None
        raise RasterError(
            f"{p}: data type {dtype} needs a scaling to 8 bits. Pass --scale percentile"
            " (per-band 2-98 % stretch) or --scale MIN,MAX (e.g. --scale 0,3000 for reflectance)."
        )
    if choice == "percentile":
        return _percentile_stretch(ds, bands, alpha, nodata)
    if isinstance(choice, tuple) and len(choice) == 2:
        lo, hi = float(choice[0]), float(choice[1])
        if not hi > lo:
            raise RasterError(f"{p}: --scale MIN,MAX needs MIN < MAX, got {lo},{hi}.")
        return tuple((lo, hi) for _ in bands)
    raise RasterError(f"{p}: unknown scale {choice!r}; use 'percentile' or (min, max).")


def _percentile_stretch(
    ds: object, bands: tuple[int, ...], alpha: int | None, nodata: float | None
) -> tuple[tuple[float, float], ...]:
    """Per-band 2-98 % stretch from a decimated read (at most about 1 Mpx)."""
    height, width = ds.height, ds.width  # type: ignore[attr-defined]
    f = max(1, int(np.ceil(np.sqrt(height * width / 1e6))))
    shape = (max(1, height // f), max(1, width // f))
    idx = list(dict.fromkeys(bands)) + ([alpha] if alpha else [])
    data = ds.read(idx, out_shape=(len(idx), *shape)).astype(np.float64)  # type: ignore[attr-defined]
    colour = {b: data[i] for i, b in enumerate(idx) if b != alpha}
    valid = np.ones(shape, dtype=bool)
    if alpha:
        valid &= data[-1] > 0
    for arr in colour.values():
        valid &= np.isfinite(arr)
        if nodata is not None:
            valid &= arr != nodata
    out = []
    for b in bands:
        v = colour[b][valid]
        lo, hi = (np.percentile(v, PERCENTILE_STRETCH) if v.size else (0.0, 1.0))
        out.append((float(lo), float(hi) if hi > lo else float(lo) + 1.0))
    return tuple(out)


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
        msg = f"cannot read back window ({wy},{wx}): {_first_line(e)}"
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
