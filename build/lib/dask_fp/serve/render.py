"""Pixels for the map page: web-mercator tiles, whole-source previews and stored-tile thumbnails, as PNG.

Every function takes a source record from the store's sources table (never a
path from a request) and applies the same band choice, scaling and
empty-pixel rules as ingest (:func:`dask_fp.raster.to_rgb_and_empty`), so the
map shows what the model saw. Empty pixels (black, nodata, alpha 0) become
transparent.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from rio_tiler.errors import TileOutsideBounds  # imported once here: importing it in threads races
from rio_tiler.io import Reader

from ..errors import RasterError
from ..raster import read_window, to_rgb_and_empty

#: Largest side of a whole-source preview (sources without a CRS are shown as one picture).
PREVIEW_MAX = 2048


class OutsideSource(RasterError):
    """The requested map tile does not touch the source."""


def png(rgb: np.ndarray, alpha: np.ndarray | None = None) -> bytes:
    """``(h, w, 3)`` uint8 (and an optional ``(h, w)`` bool/uint8 alpha) as PNG bytes."""
    from PIL import Image

    arr = rgb if alpha is None else np.dstack([rgb, np.where(alpha, 255, 0).astype(np.uint8)])
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _convert(source: dict[str, Any], data: np.ndarray, valid: np.ndarray | None) -> bytes:
    """Raw band values ``(bands[+alpha], h, w)`` to an RGBA PNG with the ingest conversion."""
    scale = source.get("scale")
    rgb, empty = to_rgb_and_empty(
        data, n_colour=len(source["bands"]), has_alpha=bool(source.get("alpha")), nodata=source.get("nodata"),
        scale=None if scale is None else tuple(tuple(s) for s in scale),
    )
    show = ~empty if valid is None else (~empty & valid)
    return png(rgb.transpose(1, 2, 0), show)


def _indexes(source: dict[str, Any]) -> list[int]:
    return [int(b) for b in source["bands"]] + ([int(source["alpha"])] if source.get("alpha") else [])


def map_tile(source: dict[str, Any], z: int, x: int, y: int, *, size: int = 256) -> bytes:
    """Web-mercator tile ``z/x/y`` of a source with a CRS, as RGBA PNG (rio-tiler ``Reader.tile``).

    Raises :class:`OutsideSource` when the tile does not touch the source.
    """
    if not source.get("crs"):
        raise RasterError(f"{source['path']} has no CRS: it has no web-mercator tiles; use its preview.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Reader(source["path"]) as r:
                img = r.tile(x, y, z, tilesize=size, indexes=_indexes(source))
    except TileOutsideBounds:
        raise OutsideSource(f"tile {z}/{x}/{y} is outside {source['path']}") from None
    except Exception as e:  # missing, changed or damaged since ingest
        raise RasterError(f"{source['path']}: cannot render tile {z}/{x}/{y}: {e}") from None
    valid = np.asarray(img.mask) > 0
    return _convert(source, np.asarray(img.data), valid)


def preview(source: dict[str, Any], *, max_side: int = PREVIEW_MAX) -> tuple[bytes, float]:
    """The whole cropped source, decimated so its longer side is at most ``max_side``; (PNG, factor).

    ``factor`` is source pixels per preview pixel. Used for sources without a
    CRS, which the page shows in their own pixel space.
    """
    import rasterio
    from rasterio.enums import Resampling

    h, w = (int(v) for v in source["shape"][:2])
    factor = max(1.0, max(h, w) / max_side)
    out = (max(1, round(h / factor)), max(1, round(w / factor)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rasterio.open(source["path"]) as ds:
                data = ds.read(_indexes(source), out_shape=(len(_indexes(source)), *out),
                               resampling=Resampling.nearest)
    except Exception as e:
        raise RasterError(f"{source['path']}: cannot read a preview: {e}") from None
    return _convert(source, data, None), factor


def thumbnail(source: dict[str, Any], wy: int, wx: int, *, tile: int, stride: int) -> bytes:
    """A stored window's pixels, read back from its source (:func:`dask_fp.raster.read_window`), as PNG."""
    return png(read_window(source, wy, wx, tile=tile, stride=stride))
