"""Inspect sources on the client: is each file a usable orthomosaic, and how is it read?

:func:`inspect_raster` checks one file's header (driver, bands, alpha, nodata,
data type, a read of its last block) and returns a :class:`RasterSpec`, a
frozen, picklable description a worker needs: bands to use, alpha, nodata,
the scaling to uint8, CRS and transform, content hash.
:func:`inspect_rasters` checks many files at once in threads. Every problem is
a :class:`~dask_fp.errors.RasterError` naming the file and what to do.
Reading pixels is :mod:`dask_fp.raster`'s job.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import RasterError
from .inputs import file_sha256, gdal_path, gdal_reason, remote_error
from .tiling import Affine6, crop_size

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
            raise RasterError(remote_error(p, f"{kind}{gdal_reason(e)}")) from None
        raise RasterError(
            f"{p}: not a readable raster ({kind}{gdal_reason(e)}). Is it a GeoTIFF/COG, and is it complete?"
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
